"""Validation and repair of single files (engine.data.jpeg)."""

import numpy as np
import pytest
import torch
from torchvision.io import decode_jpeg

from engine.data import jpeg
from engine.data.synthetic import _image, _jpeg, _patch_sof_size, _pil_jpeg, _png

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
LIMITS = jpeg.Limits()


@pytest.fixture(scope="module")
def base():
    return _image(np.random.default_rng(0), 48, 72, 3)


@pytest.fixture(scope="module")
def good(base):
    return _jpeg(base, 90)


def test_good_jpeg_passes_unchanged(good):
    c = jpeg.check_image(good, LIMITS)
    assert (c.action, c.reason, c.height, c.width) == ("ok", "", 48, 72)
    assert c.data is good


def test_header_parse(good):
    info = jpeg.parse_jpeg_header(good)
    assert (info.sof, info.precision, info.height, info.width, info.components) == (0xC0, 8, 48, 72, 3)
    assert info.orientation == 1 and info.has_eoi


@pytest.mark.parametrize("make,reason", [
    (lambda g: b"", "empty"),
    (lambda g: g[: len(g) // 2], "truncated"),
    (lambda g: g[:-2], "truncated"),
    (lambda g: b"GIF89a not really", "not_an_image"),
    (lambda g: g[: len(g) // 2] + g[len(g) // 2 + 200 :], "corrupt"),
    (lambda g: _patch_sof_size(g, 60000, 60000), "too_large"),
    (lambda g: _patch_sof_size(g, 4, 6), "too_small"),
])
def test_bad_files_are_skipped(good, make, reason):
    c = jpeg.check_image(make(good), LIMITS)
    assert (c.action, c.reason) == ("skipped", reason), c.detail
    assert c.data is None


def test_file_too_large(good):
    c = jpeg.check_image(good, jpeg.Limits(max_bytes=100))
    assert (c.action, c.reason) == ("skipped", "file_too_large")


@pytest.mark.parametrize("kind,reason", [("png", "not_jpeg"), ("cmyk", "cmyk"), ("progressive", "progressive")])
def test_repairable_files_become_baseline_rgb_jpegs(base, kind, reason):
    pytest.importorskip("PIL", reason="Pillow writes the CMYK and progressive test files")
    data = {"png": lambda: _png(base), "cmyk": lambda: _pil_jpeg(base, "CMYK"),
            "progressive": lambda: _pil_jpeg(base, "RGB", progressive=True)}[kind]()
    c = jpeg.check_image(data, LIMITS)
    assert (c.action, c.reason, c.height, c.width) == ("reencoded", reason, 48, 72)
    info = jpeg.parse_jpeg_header(c.data)
    assert info.sof == 0xC0 and info.components == 3 and info.orientation == 1
    out = decode_jpeg(torch.frombuffer(bytearray(c.data), dtype=torch.uint8))
    assert (out.float() - torch.from_numpy(base).float()).abs().mean() < 12  # same picture, lossy twice
    # Progressive files may be kept when asked.
    if kind == "progressive":
        assert jpeg.check_image(data, jpeg.Limits(reencode_progressive=False)).action == "ok"


def test_exif_orientation_is_read_and_sizes_are_oriented(base):
    pytest.importorskip("PIL", reason="Pillow writes the EXIF test file")
    data = _pil_jpeg(base, "RGB", orientation=6)
    assert jpeg.parse_jpeg_header(data).orientation == 6
    c = jpeg.check_image(data, LIMITS)
    assert (c.action, c.height, c.width) == ("ok", 72, 48)


def test_grayscale_is_valid(base):
    c = jpeg.check_image(_jpeg(base[:1], 90), LIMITS)
    assert (c.action, c.height, c.width) == ("ok", 48, 72)


def test_dali_checker_finds_the_bad_one(good):
    pytest.importorskip("nvidia.dali", reason="nvidia-dali-cuda130 is not installed")
    checker = jpeg.DaliChecker(batch_size=4)
    shapes = checker.shapes([good, good[: len(good) // 2], good, b"junk"])
    assert shapes == [(48, 72), None, (48, 72), None]
