"""Hashtags: extraction from captions, canonicalisation, the top-K vocabulary and
the resampling weights.

- Hashtag text, one rule (`RULE`) wherever hashtags are read (captions, tag lists,
  YFCC100M user and machine tags, synonym maps): Unicode NFKC, then case folding,
  then NFKC again (case folding can leave a string unnormalised). NFKC rather than
  NFC because it also merges the compatibility variants that input methods produce
  for one word: fullwidth Latin and digits and the fullwidth '＃' of CJK keyboards,
  halfwidth katakana, Arabic presentation forms, ligatures; NFC keeps each as a
  separate tag (24 real spellings of 14 words: 19 tags under NFC, 14 under NFKC).
  The price: a few symbols become letters or digits ("#h₂o" is "h2o", "#brand™" is
  "brandtm"), and Korean compatibility jamo ("ㅋㅋ") become conjoining jamo (one tag
  still, shown differently in vocab.json).
- A hashtag in a caption is `#` followed by letters, marks (Mn, Mc, Me: the vowel
  signs and viramas of Indic scripts, Thai vowels and tones, Arabic harakat, accents
  in decomposed form), decimal digits, connector punctuation ('_') and the joiners
  ZWNJ/ZWJ that Persian and Indic spellings need; a joiner at either end is dropped.
  Explicit tags (a leading `#` is optional) keep any character, e.g. YFCC's "new
  york" or "vision:outdoor=099".
- Text that is not valid UTF-8 never becomes a hashtag: a percent-encoded tag whose
  bytes do not decode (`decode_percent_tag`), or a caption hashtag touching U+FFFD
  (what a lossy decoder left), is reported with a reason instead.
- A synonym map sends a hashtag to its canonical form; chains are followed
  (a -> b -> c gives c), a cycle is an error.
- The vocabulary is the K most frequent canonical hashtags, counted as the number
  of images (after validation, deduplication and evaluation-set removal) that
  carry the hashtag; ties are broken by the hashtag's string, so ids are
  deterministic. Id 0 is the most frequent hashtag.
- Resampling weight of an image i with kept hashtags T_i (see `image_weights`):

      w_i = sum over h in T_i of  1 / sqrt(c_h)

  where c_h is the number of images carrying h. This is exactly "draw a hashtag h
  with probability proportional to sqrt(c_h), then an image uniformly among the
  c_h images that carry it": the sampled frequency of each hashtag becomes
  proportional to the square root of its frequency (Mahajan et al. 2018), and an
  image with several hashtags can be reached through each of them.
  `weighting="mean"` (divide by |T_i|) and `"max"` are available as options.
"""

from __future__ import annotations

import csv
import json
import os
import unicodedata
from typing import Iterable, Optional, Union
from urllib.parse import unquote_to_bytes

import numpy as np

PRESETS = {"1.5k": 1500, "8.5k": 8500, "17k": 17000}
# Changing how hashtag text is read changes the hashtags of existing metadata: the
# builder puts RULE in its fingerprints, so such a build starts over instead of mixing
# parts read under two rules. The Unicode version is part of it (new letters, marks).
RULE = f"nfkc-casefold-nfkc/marks-joiners/1 unicode {unicodedata.unidata_version}"
_JOINERS = "\u200c\u200d"
_REPLACEMENT = "\ufffd"


def normalize_text(text: str) -> str:
    if text.isascii():  # NFKC leaves ASCII as it is; casefold is lower(): the common case, 5x faster
        return text.lower()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def normalize_tag(tag: str) -> str:
    """An explicit tag under RULE; '' when nothing is left."""
    return normalize_text(tag).strip().lstrip("#").strip()


def normalize_tags(tags: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Explicit tags under RULE, deduplicated in order; those holding U+FFFD (text a
    lossy decoder replaced) as (tag, reason) instead."""
    kept, bad = [], []
    for t in tags:
        if _REPLACEMENT in t:
            bad.append((t, "invalid_utf8"))
        else:
            kept.append(normalize_tag(t))
    return unique(kept), bad


def _hashtag_char(c: str) -> bool:
    cat = unicodedata.category(c)
    return cat[0] in "LM" or cat in ("Nd", "Pc") or c in _JOINERS


def extract_hashtags_checked(caption: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(hashtags in order of first appearance, [(text, reason)] of those rejected)."""
    text = normalize_text(caption)
    tags, bad = [], []
    at = text.find("#")
    while at >= 0:
        end = at + 1
        while end < len(text) and _hashtag_char(text[end]):
            end += 1
        tag = text[at + 1 : end].strip(_JOINERS)
        if end < len(text) and text[end] == _REPLACEMENT:
            bad.append((text[at : end + 1], "invalid_utf8"))
        elif tag:
            tags.append(tag)
        at = text.find("#", end)
    return unique(tags), bad


def extract_hashtags(caption: str) -> list[str]:
    return extract_hashtags_checked(caption)[0]


def decode_percent_tag(raw: str) -> Optional[str]:
    """A URL-encoded tag ('+' for a space) as text, or None when its bytes are not UTF-8
    (e.g. '%E9t%E9', Latin-1 escapes): never a U+FFFD stand-in."""
    if "%" not in raw:
        return raw.replace("+", " ")
    try:
        return unquote_to_bytes(raw.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        return None


def unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for x in items:
        if x and x not in seen:
            seen[x] = None
    return list(seen)


def parse_vocab_size(value: Union[int, str]) -> int:
    """An int, or one of the presets '1.5k', '8.5k', '17k' (also '1500', '2k', ...)."""
    if isinstance(value, int):
        k = value
    else:
        text = str(value).strip().lower()
        if text in PRESETS:
            k = PRESETS[text]
        else:
            try:
                k = int(round(float(text[:-1]) * 1000)) if text.endswith("k") else int(text)
            except ValueError:
                raise ValueError(f"vocab_size {value!r}: expected an integer or one of {sorted(PRESETS)}") from None
    if k < 1:
        raise ValueError(f"vocab_size must be at least 1, got {value!r}")
    return k


def load_synonyms(path: Optional[str]) -> dict[str, str]:
    """A JSON object {hashtag: canonical}, or a CSV/TSV file of two columns
    (hashtag, canonical; a header line 'hashtag,canonical' is allowed)."""
    if not path:
        return {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"synonym map {path!r} does not exist")
    raw: dict[str, str] = {}
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"synonym map {path}: invalid JSON ({e})") from None
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
            raise ValueError(f"synonym map {path}: expected a JSON object of strings {{hashtag: canonical}}")
        raw = obj
    else:
        with open(path, encoding="utf-8", newline="") as f:
            dialect = "excel-tab" if path.endswith((".tsv", ".txt")) else "excel"
            for lineno, row in enumerate(csv.reader(f, dialect=dialect), 1):
                if not row or (row[0].startswith("#") and len(row) == 1):
                    continue
                if len(row) != 2:
                    raise ValueError(f"synonym map {path}:{lineno}: expected 2 columns, got {len(row)}")
                if lineno == 1 and [c.strip().lower() for c in row] == ["hashtag", "canonical"]:
                    continue
                raw[row[0]] = row[1]
    synonyms = {normalize_tag(k): normalize_tag(v) for k, v in raw.items()}
    synonyms = {k: v for k, v in synonyms.items() if k and v and k != v}
    resolved: dict[str, str] = {}
    for start in synonyms:
        tag, seen = start, [start]
        while tag in synonyms:
            tag = synonyms[tag]
            if tag in seen:
                raise ValueError(f"synonym map {path}: cycle {' -> '.join(seen + [tag])}")
            seen.append(tag)
        resolved[start] = tag
    return resolved


def canonicalize(tags: Iterable[str], synonyms: dict[str, str]) -> list[str]:
    return unique(synonyms.get(t, t) for t in tags)


def build_vocab(tag_lists: Iterable[list[str]], k: int, min_count: int = 1) -> tuple[list[str], list[int]]:
    """The top-k hashtags by image count (ties by string), with their counts."""
    counts: dict[str, int] = {}
    for tags in tag_lists:
        for t in tags:
            counts[t] = counts.get(t, 0) + 1
    ranked = sorted((item for item in counts.items() if item[1] >= min_count), key=lambda kv: (-kv[1], kv[0]))
    ranked = ranked[:k]
    return [t for t, _ in ranked], [c for _, c in ranked]


def image_weights(tag_ids: list[np.ndarray], counts: np.ndarray, weighting: str = "sum") -> np.ndarray:
    """Per-image resampling weights from inverse-square-root hashtag frequency
    (module docstring). `tag_ids[i]` holds image i's hashtag ids."""
    inv = 1.0 / np.sqrt(np.asarray(counts, dtype=np.float64))
    out = np.empty(len(tag_ids), dtype=np.float64)
    for i, ids in enumerate(tag_ids):
        v = inv[ids]
        if weighting == "sum":
            out[i] = v.sum()
        elif weighting == "mean":
            out[i] = v.mean()
        elif weighting == "max":
            out[i] = v.max()
        else:
            raise ValueError(f"weighting {weighting!r}: expected 'sum', 'mean' or 'max'")
    return out


def write_vocab(path: str, hashtags: list[str], counts: list[int], extra: Optional[dict] = None) -> None:
    payload = {
        "format": "engine-vocab/1",
        "size": len(hashtags),
        "hashtags": hashtags,  # id -> hashtag
        "counts": counts,  # id -> number of images carrying it
        "hashtag_to_id": {t: i for i, t in enumerate(hashtags)},
    }
    if extra:
        payload.update(extra)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)


def read_vocab(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vocabulary {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        return json.load(f)

