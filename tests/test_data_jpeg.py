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


def _icc_png(base, profile: bytes) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(base.transpose(1, 2, 0))).save(buf, format="PNG", icc_profile=profile)
    return buf.getvalue()


def _srgb_profile_with_d65_pcs() -> bytes:
    """A real sRGB profile whose header names a non-D50 PCS illuminant: Pillow and
    browsers use it, libpng warns about it and ignores it."""
    from PIL import ImageCms

    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile[68:72] = (0xF000).to_bytes(4, "big")  # X of the PCS illuminant (bytes 68..79)
    return bytes(profile)


def test_png_whose_icc_profile_makes_libpng_warn_is_kept(base):
    from torchvision.io import decode_png

    data = _icc_png(base, _srgb_profile_with_d65_pcs())
    with jpeg.captured_stderr() as err:
        decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    assert b"libpng warning: iCCP" in err[0]  # libpng does warn: this is the case under test
    c = jpeg.check_image(data, LIMITS)
    assert (c.action, c.reason, c.height, c.width) == ("reencoded", "not_jpeg", 48, 72), c.detail
    out = decode_jpeg(torch.frombuffer(bytearray(c.data), dtype=torch.uint8))
    assert (out.float() - torch.from_numpy(base).float()).abs().mean() < 12


def test_jpeg_with_junk_before_its_end_marker_is_kept(good):
    data = good[:-2] + b"\x00trailing junk" + good[-2:]
    with jpeg.captured_stderr() as err:
        jpeg.decode_rgb(data)
    assert b"extraneous bytes before marker 0xd9" in err[0]
    c = jpeg.check_image(data, LIMITS)
    assert (c.action, c.reason, c.height, c.width) == ("ok", "", 48, 72), c.detail


def test_corrupt_png_and_jpeg_are_still_rejected_with_a_reason(base, good):
    intact = _icc_png(base, _srgb_profile_with_d65_pcs())
    png = bytearray(intact)
    at = png.index(b"IDAT") + 40
    png[at : at + 16] = bytes(16)  # pixel data: the zlib stream is broken (this crashes torchvision's decode_png)
    c = jpeg.check_image(bytes(png), LIMITS)
    assert (c.action, c.reason) == ("skipped", "undecodable") and "broken data stream" in c.detail, c.detail
    c = jpeg.check_image(intact[: len(intact) // 2], LIMITS)
    assert (c.action, c.reason) == ("skipped", "undecodable") and "truncated" in c.detail, c.detail
    # A hole in the scan data: libjpeg warns "premature end of data segment", pixels are wrong.
    mid = len(good) // 2
    c = jpeg.check_image(good[:mid] + good[mid + 200 :], LIMITS)
    assert (c.action, c.reason) == ("skipped", "corrupt") and "premature end" in c.detail


@pytest.mark.parametrize("text,harmless", [
    ("", True),
    ("Corrupt JPEG data: 3 extraneous bytes before marker 0xd9\n", True),
    ("Warning: unknown JFIF revision number 1.03\n", True),
    ("Corrupt JPEG data: premature end of data segment\n", False),
    ("Corrupt JPEG data: 3 extraneous bytes before marker 0xd0\n", False),  # inside the scan: data lost
    ("Corrupt JPEG data: 3 extraneous bytes before marker 0xd9\nCorrupt JPEG data: bad Huffman code\n", False),
    ("something no decoder here is known to print\n", False),
])
def test_decoder_messages_are_judged_line_by_line(text, harmless):
    assert jpeg.decoder_messages_harmless(text) is harmless
