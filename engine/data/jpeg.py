"""JPEG inspection, validation and repair for the dataset builder.

Nothing malformed may reach a shard: DALI cannot skip a bad image at train time
(the pipeline aborts). `check_image(data)` decides, for one file's bytes, whether
it goes into a shard as is, is re-encoded to a baseline RGB JPEG first, or is
skipped, and why. It reads the JPEG header itself (no decoding) so that absurdly
large images are refused before any decoder allocates memory, then decodes with
torchvision (libjpeg-turbo, the PyTorch loader's decoder), other formats with
Pillow (see decode_rgb for why not libpng). What libjpeg writes to stderr is
judged line by line (`decoder_messages_harmless`): a warning that leaves every
pixel as the file means it (junk between the last scan and the end-of-image
marker) keeps the image; any other message ("Corrupt JPEG data: premature end of
data segment", an unknown line) means the pixels may be wrong and the image is
skipped as corrupt. A PNG whose ICC profile makes libpng warn is read by Pillow
and kept (re-encoded, as every non-JPEG). The builder decodes the
survivors again with DALI (`DaliChecker`), the training decoder.

Reasons, by action:

- skipped: missing, unreadable (e.g. a directory), empty, file_too_large,
  not_an_image, truncated (no end-of-image marker), corrupt (a decoder error or
  libjpeg warning on a complete file), too_large / too_small (pixels or side, from
  the header), undecodable (not a JPEG and no decoder reads it),
  dali_undecodable (DALI fails on it even after a re-encode)
- re-encoded: cmyk, unsupported_colour (not 1 or 3 components, or RGB-coded),
  unsupported_jpeg (12-bit, lossless, arithmetic), progressive (the hardware
  decoder takes baseline only; optional), not_jpeg (PNG, WebP, GIF, BMP, ...),
  dali_rejected (torchvision reads it, DALI does not; the re-encode DALI reads)
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import tempfile
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

SKIP_REASONS = (
    "missing", "unreadable", "empty", "file_too_large", "not_an_image", "truncated",
    "corrupt", "too_large", "too_small", "undecodable", "dali_undecodable",
)
REENCODE_REASONS = ("cmyk", "unsupported_colour", "unsupported_jpeg", "progressive", "not_jpeg", "dali_rejected")

_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_LOSSLESS = {0xC3, 0xC7, 0xCB, 0xCF}
_ARITHMETIC = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class JpegHeaderError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class JpegInfo:
    sof: int  # the frame marker, 0xC0 baseline, 0xC2 progressive, ...
    precision: int
    height: int  # as stored, before EXIF orientation
    width: int
    components: int
    adobe_transform: Optional[int]
    orientation: int  # EXIF orientation 1..8 (1 when absent)
    has_eoi: bool

    @property
    def progressive(self) -> bool:
        return self.sof in _PROGRESSIVE

    @property
    def oriented_hw(self) -> tuple[int, int]:
        """(height, width) after the EXIF rotation every decoder here applies."""
        if self.orientation in (5, 6, 7, 8):
            return self.width, self.height
        return self.height, self.width


def is_jpeg(data: bytes) -> bool:
    return len(data) >= 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF


def _exif_orientation(seg: bytes) -> int:
    """Orientation tag (0x0112) of an APP1 Exif segment's IFD0; 1 when absent or malformed."""
    try:
        tiff = seg[6:]
        endian = {b"II": "<", b"MM": ">"}[bytes(tiff[:2])]
        (ifd,) = struct.unpack(endian + "I", tiff[4:8])
        (count,) = struct.unpack(endian + "H", tiff[ifd : ifd + 2])
        for i in range(count):
            entry = tiff[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, typ = struct.unpack(endian + "HH", entry[:4])
            if tag == 0x0112 and typ == 3:
                (value,) = struct.unpack(endian + "H", entry[8:10])
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error, IndexError):
        pass
    return 1


def parse_jpeg_header(data: bytes) -> JpegInfo:
    """Reads the markers up to the first scan. Raises JpegHeaderError(reason) with
    reason 'not_an_image', 'truncated' or 'corrupt'."""
    if not is_jpeg(data):
        raise JpegHeaderError("not_an_image", "no JPEG start-of-image marker")
    n = len(data)
    i = 2
    sof = None
    adobe = None
    orientation = 1
    while True:
        if i >= n:
            raise JpegHeaderError("truncated", "file ends inside the JPEG header")
        if data[i] != 0xFF:
            raise JpegHeaderError("corrupt", f"expected a JPEG marker at byte {i}")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            raise JpegHeaderError("truncated", "file ends inside the JPEG header")
        marker = data[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9:
            raise JpegHeaderError("corrupt", "end-of-image marker before any scan")
        if i + 2 > n:
            raise JpegHeaderError("truncated", "file ends inside the JPEG header")
        (length,) = struct.unpack(">H", data[i : i + 2])
        if length < 2:
            raise JpegHeaderError("corrupt", f"bad segment length {length} at byte {i}")
        if i + length > n:
            raise JpegHeaderError("truncated", "file ends inside a JPEG header segment")
        seg = data[i + 2 : i + length]
        if marker in _SOF_MARKERS:
            if len(seg) < 6:
                raise JpegHeaderError("corrupt", "short frame header")
            precision, height, width, comps = struct.unpack(">BHHB", seg[:6])
            sof = (marker, precision, height, width, comps)
        elif marker == 0xE1 and seg[:6] == b"Exif\x00\x00":
            orientation = _exif_orientation(seg)
        elif marker == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12:
            adobe = seg[11]
        elif marker == 0xDA:
            if sof is None:
                raise JpegHeaderError("corrupt", "scan before any frame header")
            break
        i += length
    marker, precision, height, width, comps = sof
    # The last two bytes are normally EOI; some writers append data after it.
    has_eoi = data.endswith(b"\xff\xd9") or data.rfind(b"\xff\xd9", i) >= 0
    return JpegInfo(marker, precision, height, width, comps, adobe, orientation, has_eoi)


@contextlib.contextmanager
def captured_stderr(also_stdout: bool = False):
    """Captures what C libraries (libjpeg warnings, DALI logs) write to fds 2 (and 1).
    Yields a list that holds the captured bytes after the block."""
    fds = [2] + ([1] if also_stdout else [])
    out: list[bytes] = []
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    with tempfile.TemporaryFile() as tmp:
        saved = [os.dup(fd) for fd in fds]
        try:
            for fd in fds:
                os.dup2(tmp.fileno(), fd)
            yield out
        finally:
            for fd, s in zip(fds, saved):
                os.dup2(s, fd)
                os.close(s)
            tmp.seek(0)
            out.append(tmp.read())


def _tensor(data: bytes):
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_rgb(data: bytes):
    """Decodes image bytes to a uint8 [3, H, W] RGB tensor with EXIF orientation
    applied: JPEG with torchvision (libjpeg-turbo, the PyTorch loader's decoder),
    anything else (PNG, GIF, WebP, BMP, ...) with Pillow. torchvision's PNG decoder
    must not see untrusted files: a libpng error inside the pixel data (a broken
    IDAT stream) kills the process with a segmentation fault (torchvision 0.29)."""
    if is_jpeg(data):
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(_tensor(data), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    return _pil_rgb(data)


def encode_baseline_jpeg(image, quality: int) -> bytes:
    """A baseline (sequential), 8-bit, 3-component YCbCr JPEG with no EXIF."""
    from torchvision.io import encode_jpeg

    return encode_jpeg(image.contiguous(), quality=quality).numpy().tobytes()


@dataclass
class Limits:
    max_bytes: int = 32 << 20
    max_pixels: int = 50_000_000
    max_side: int = 16384
    min_side: int = 8
    reencode_progressive: bool = True
    quality: int = 90


@dataclass
class Checked:
    action: str  # "ok", "reencoded" or "skipped"
    reason: str  # "" when ok
    data: Optional[bytes] = None  # the bytes that go into a shard (None when skipped)
    height: int = 0  # of the decoded (oriented) image
    width: int = 0
    detail: str = ""


def _size_problem(h: int, w: int, limits: Limits) -> Optional[str]:
    if h * w > limits.max_pixels or max(h, w) > limits.max_side:
        return "too_large"
    if min(h, w) < limits.min_side:
        return "too_small"
    return None


# libjpeg-turbo messages that leave every pixel as the file means it. It warns about
# bytes between the last scan's data and the end-of-image marker (0xd9) only after
# every MCU was decoded (a short scan adds "premature end of data segment"). Other
# formats go through Pillow, which raises on broken pixel data and reports nothing
# on stderr (an ICC profile libpng would warn about is simply read).
_HARMLESS_MESSAGES = (
    re.compile(r"Corrupt JPEG data: \d+ extraneous bytes before marker 0xd9"),
    re.compile(r"Warning: unknown JFIF revision number \d+\.\d+"),
)


def decoder_messages_harmless(text: str) -> bool:
    """True when every line a decoder wrote is a known metadata-only warning."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return all(any(p.fullmatch(line) for p in _HARMLESS_MESSAGES) for line in lines)


def _strict_decode(data: bytes):
    """torchvision decode that fails on a decoder error or on a decoder message that
    may mean wrong pixels (see decoder_messages_harmless). Returns (tensor, None)
    or (None, (reason, detail))."""
    try:
        # Python warnings (e.g. a library's deprecation notice) would land in the captured
        # stderr and read as a decoder message: record them instead.
        with warnings.catch_warnings(record=True), captured_stderr() as err:
            image = decode_rgb(data)
    except Exception as e:  # decoders raise RuntimeError, OSError, ValueError, ...
        # The file has its end-of-image marker (checked before), so a decoder that stops
        # early ("incomplete or truncated") met corrupt data.
        msg = str(e).splitlines()[0][-200:] if str(e) else type(e).__name__
        return None, ("corrupt", msg)
    text = err[0].decode(errors="replace") if err else ""
    if not decoder_messages_harmless(text):
        return None, ("corrupt", text.strip()[:200])
    return image, None


def check_image(data: bytes, limits: Limits) -> Checked:
    """Validates one file's bytes; see the module docstring for the outcomes."""
    if len(data) == 0:
        return Checked("skipped", "empty")
    if len(data) > limits.max_bytes:
        return Checked("skipped", "file_too_large", detail=f"{len(data)} bytes")
    if is_jpeg(data):
        try:
            info = parse_jpeg_header(data)
        except JpegHeaderError as e:
            return Checked("skipped", e.reason, detail=str(e))
        h, w = info.oriented_hw
        problem = _size_problem(h, w, limits)
        if problem:  # decided from the header: no decoder ever sees a decompression bomb
            return Checked("skipped", problem, detail=f"{w}x{h}")
        if not info.has_eoi:
            return Checked("skipped", "truncated", detail="no end-of-image marker")
        reencode = None
        if info.components == 4:
            reencode = "cmyk"
        elif info.components not in (1, 3) or (info.components == 3 and info.adobe_transform == 0):
            reencode = "unsupported_colour"
        elif info.precision != 8 or info.sof in _LOSSLESS or info.sof in _ARITHMETIC:
            reencode = "unsupported_jpeg"
        elif info.progressive and limits.reencode_progressive:
            reencode = "progressive"
        image, fail = _strict_decode(data)
        if fail is not None:
            if reencode is None:
                return Checked("skipped", fail[0], detail=fail[1])
            image = _pil_decode(data)  # e.g. a 12-bit or arithmetic-coded JPEG only Pillow reads
            if image is None:
                return Checked("skipped", "undecodable", detail=fail[1])
        if tuple(image.shape[1:]) != (h, w):
            return Checked("skipped", "corrupt", detail=f"decoded {tuple(image.shape[1:])}, header {(h, w)}")
        if reencode is None:
            return Checked("ok", "", data, h, w)
        return _reencoded(image, reencode, limits)
    # Not a JPEG: re-encode what a decoder can read (PNG, GIF, WebP, BMP, ...).
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header only
            w, h = im.size
    except Exception:
        return Checked("skipped", "not_an_image")
    problem = _size_problem(h, w, limits)
    if problem:
        return Checked("skipped", problem, detail=f"{w}x{h}")
    image, fail = _strict_decode(data)
    if fail is not None:
        return Checked("skipped", "undecodable", detail=fail[1])
    return _reencoded(image, "not_jpeg", limits)


def _pil_rgb(data: bytes):
    """Pillow decode to a uint8 [3, H, W] tensor (EXIF orientation applied); raises
    on a file Pillow cannot read completely."""
    import torch
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()


def _pil_decode(data: bytes):
    """_pil_rgb, or None when Pillow cannot read the file."""
    try:
        return _pil_rgb(data)
    except Exception:
        return None


def _reencoded(image, reason: str, limits: Limits) -> Checked:
    h, w = int(image.shape[1]), int(image.shape[2])
    problem = _size_problem(h, w, limits)
    if problem:
        return Checked("skipped", problem, detail=f"{w}x{h}")
    data = encode_baseline_jpeg(image, limits.quality)
    again = check_image(data, Limits(**{**limits.__dict__, "reencode_progressive": True}))
    if again.action != "ok":  # cannot happen with a sane encoder; never ship it
        return Checked("skipped", "undecodable", detail=f"re-encoded image failed: {again.reason}")
    return Checked("reencoded", reason, data, h, w)


class DaliChecker:
    """Decodes batches of encoded images with DALI (the training decoder) and
    returns the decoded (height, width) of each, or None where DALI fails."""

    def __init__(self, device: str = "cpu", batch_size: int = 64, num_threads: int = 1):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        self.batch_size = batch_size
        self._feed: list = []
        mixed = device in ("mixed", "gpu", "cuda")
        device_id = None
        if mixed:
            import torch

            device_id = torch.cuda.current_device()

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1)
        def pipe():
            x = fn.external_source(source=lambda: self._feed, batch=True, dtype=types.UINT8)
            return fn.decoders.image(x, device="mixed" if mixed else "cpu", output_type=types.RGB)

        self._pipe = pipe()
        self._pipe.build()

    def _run(self, items: list[bytes]):
        self._feed[:] = [np.frombuffer(b, dtype=np.uint8) for b in items]
        with captured_stderr(also_stdout=True):
            (out,) = self._pipe.run()
        return [tuple(out[i].shape()[:2]) for i in range(len(items))]

    def shapes(self, items: list[bytes]) -> list[Optional[tuple[int, int]]]:
        result: list[Optional[tuple[int, int]]] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            try:
                result.extend(self._run(chunk))
            except Exception:
                for b in chunk:  # find the culprits one by one
                    try:
                        result.extend(self._run([b]))
                    except Exception:
                        result.append(None)
        return result


def dali_available() -> Optional[str]:
    """None when nvidia.dali imports, else why not."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising OSError
        return f"nvidia.dali is not importable ({type(e).__name__}: {e})"
    return None
