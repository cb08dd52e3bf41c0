"""Hashtag extraction, synonyms, the top-K vocabulary and resampling weights."""

import json
import unicodedata

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


# Real words; each must come out of a caption whole, the same in composed and decomposed
# form, from a caption and from a tag list. Several carry combining marks (Mn/Mc) that
# `\w` stops at, the cut that turned #हिन्दी into "ह".
WORDS = {
    "hindi": "हिन्दी", "hindi2": "हवा", "tamil": "தமிழ்", "thai": "ภาษาไทย", "thai_tones": "สวัสดี",
    "bengali": "বাংলা", "arabic": "العربية", "arabic_harakat": "مَرْحَبًا", "cjk": "東京", "hangul": "한국어",
    "latin": "crème_brûlée", "persian_zwnj": "می\u200cخواهم",
}


@pytest.mark.parametrize("name", sorted(WORDS))
def test_hashtags_in_every_script_survive_whole(name):
    word = WORDS[name]
    for form in ("NFC", "NFD"):
        written = unicodedata.normalize(form, word)
        assert vocab.extract_hashtags(f"x #{written}, y") == [word], form
        assert vocab.normalize_tag("#" + written) == word, form


def test_hashtag_rule_folds_variants_and_stops_at_punctuation():
    assert vocab.extract_hashtags("#हिन्दी #हवा #தமிழ்") == ["हिन्दी", "हवा", "தமிழ்"]  # the examples
    cafe = ["café"]
    assert vocab.extract_hashtags("#Cafe\u0301") == cafe and vocab.extract_hashtags("#CAFÉ") == cafe
    # NFKC: the fullwidth '＃' and letters of CJK input methods, Arabic presentation forms.
    assert vocab.extract_hashtags("＃ＴＯＫＹＯ ＃東京") == ["tokyo", "東京"]
    assert vocab.extract_hashtags("#\ufee3\ufeae\ufea3\ufe92\ufe8e") == ["مرحبا"]
    assert vocab.extract_hashtags("#Straße #STRASSE") == ["strasse"]
    # A joiner at an end joins nothing; punctuation and symbols end a hashtag.
    assert vocab.extract_hashtags("#a\u200d #b-c #d.e #f🙂g") == ["a", "b", "d", "f"]
    assert vocab.extract_hashtags("#2024 #_x_ #") == ["2024", "_x_"]


def test_hashtags_cut_by_a_lossy_decode_are_rejected_not_shortened():
    tags, bad = vocab.extract_hashtags_checked("#caf\ufffd #ok #\ufffdx")
    assert tags == ["ok"] and bad == [("#caf\ufffd", "invalid_utf8"), ("#\ufffd", "invalid_utf8")]
    assert vocab.normalize_tags(["Ok", "caf\ufffd", "#OK"]) == (["ok"], [("caf\ufffd", "invalid_utf8")])  # tag lists


def test_percent_decoding_refuses_bytes_that_are_not_utf8():
    assert vocab.decode_percent_tag("caf%C3%A9") == "café"
    assert vocab.normalize_tag(vocab.decode_percent_tag("cafe%CC%81")) == "café"
    assert vocab.decode_percent_tag("new+york") == "new york"
    assert vocab.decode_percent_tag("%E9t%E9") is None  # Latin-1 escapes: not U+FFFD stand-ins


def test_synonym_maps_follow_the_same_rule(tmp_path):
    p = tmp_path / "syn.json"
    p.write_text(json.dumps({unicodedata.normalize("NFD", "Café"): "COFFEE", "ＴＯＫＹＯ": "東京"}))
    assert vocab.load_synonyms(str(p)) == {"café": "coffee", "tokyo": "東京"}


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
