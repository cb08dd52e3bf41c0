"""Hashtag extraction, synonyms, the top-K vocabulary and resampling weights."""

import json

import numpy as np
import pytest

from engine.data import vocab


def test_extract_hashtags_unicode_casefold_order():
    caption = "Sunset #Beach at #東京 with #STRASSE and #straße, #beach again #café! #a_b1 #"
    assert vocab.extract_hashtags(caption) == ["beach", "東京", "strasse", "café", "a_b1"]
    assert vocab.extract_hashtags("no tags # here") == []


def test_normalize_explicit_tags():
    assert vocab.normalize_tag("  #Beach ") == "beach"
    assert vocab.normalize_tag("#") == ""


@pytest.mark.parametrize("value,k", [("1.5k", 1500), ("8.5k", 8500), ("17k", 17000), (300, 300), ("2k", 2000),
                                     ("42", 42)])
def test_vocab_size_presets(value, k):
    assert vocab.parse_vocab_size(value) == k


@pytest.mark.parametrize("value", ["big", 0, "-3"])
def test_vocab_size_rejects(value):
    with pytest.raises(ValueError, match="vocab_size"):
        vocab.parse_vocab_size(value)


def test_synonyms_json_chains_and_cycle(tmp_path):
    p = tmp_path / "syn.json"
    p.write_text(json.dumps({"#Puppy": "dog", "doggo": "puppy", "Dog": "dog"}))
    syn = vocab.load_synonyms(str(p))
    assert syn == {"puppy": "dog", "doggo": "dog"}
    assert vocab.canonicalize(["doggo", "cat", "puppy", "dog"], syn) == ["dog", "cat"]
    p.write_text(json.dumps({"a": "b", "b": "a"}))
    with pytest.raises(ValueError, match="cycle"):
        vocab.load_synonyms(str(p))


def test_synonyms_csv_and_errors(tmp_path):
    p = tmp_path / "syn.csv"
    p.write_text("hashtag,canonical\nkitty,cat\nkitten,cat\n")
    assert vocab.load_synonyms(str(p)) == {"kitty": "cat", "kitten": "cat"}
    p.write_text("kitty,cat,extra\n")
    with pytest.raises(ValueError, match=r"syn.csv:1: expected 2 columns"):
        vocab.load_synonyms(str(p))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        vocab.load_synonyms(str(tmp_path / "nope.json"))


def test_build_vocab_top_k_ties_by_string():
    tags = [["b", "a"], ["a"], ["c", "b"], ["d"], ["e"]]
    hashtags, counts = vocab.build_vocab(tags, k=3)
    assert hashtags == ["a", "b", "c"] and counts == [2, 2, 1]
    assert vocab.build_vocab(tags, k=10, min_count=2) == (["a", "b"], [2, 2])


def test_image_weights_formula():
    counts = np.array([100, 4, 1])
    ids = [np.array([0]), np.array([1]), np.array([0, 2]), np.array([1, 2])]
    w = vocab.image_weights(ids, counts, "sum")
    np.testing.assert_allclose(w, [0.1, 0.5, 1.1, 1.5])
    np.testing.assert_allclose(vocab.image_weights(ids, counts, "mean"), [0.1, 0.5, 0.55, 0.75])
    np.testing.assert_allclose(vocab.image_weights(ids, counts, "max"), [0.1, 0.5, 1.0, 1.0])


def test_sum_weighting_gives_sqrt_frequency_for_single_tag_images():
    # c_h images with one tag h each: sampled mass of h = c_h * c_h^-1/2 = sqrt(c_h).
    counts = np.array([400, 100, 25])
    ids = [np.array([h]) for h, c in enumerate(counts) for _ in range(c)]
    w = vocab.image_weights(ids, counts)
    labels = np.concatenate(ids)
    mass = np.array([w[labels == h].sum() for h in range(3)])
    np.testing.assert_allclose(mass / mass.sum(), np.sqrt(counts) / np.sqrt(counts).sum())
