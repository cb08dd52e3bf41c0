"""Lines of a metadata text file as shipped: plain, or gzip / bz2 / xz / zstd
compressed (recognised by magic bytes, whatever the name), decompressed while read,
never to a temporary copy. A plain file can be read in byte ranges aligned to line
starts, so one huge file becomes many read tasks (`byte_ranges`).

Compressed files are one task each: a gzip, bz2, xz or zstd stream can only be
decoded from its start, unless it was written as independent pieces (bgzip or
`pigz --independent`, pbzip2's concatenated bz2 streams, `xz -T` blocks, pzstd
frames), which none of the files as distributed are. Finding bz2 block starts
(48-bit magic at any bit offset) would need a first pass over the whole file, and a
block can end mid-line. When one task per file is too slow, decompress the file
once: the plain file is then split into ranges.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
from typing import Iterator, Optional

_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
_TEST = {"gzip": "gzip -t", "bz2": "bzip2 -t", "xz": "xz -t", "zstd": "zstd -t"}


def compression(path: str) -> Optional[str]:
    """'gzip', 'bz2', 'xz', 'zstd' from the file's first bytes, or None (plain)."""
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def strip_suffix(path: str) -> str:
    """The name without a compression suffix: what its format is guessed from."""
    lower = path.lower()
    for s in SUFFIXES:
        if lower.endswith(s):
            return path[: -len(s)]
    return path


def _open(path: str, kind: Optional[str]):
    if kind is None:
        return open(path, "rb")
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "bz2":
        return bz2.open(path, "rb")
    if kind == "xz":
        return lzma.open(path, "rb")
    try:
        import zstandard
    except ImportError:
        raise ValueError(f"metadata {path}: zstd-compressed; reading it needs the zstandard package "
                         "(pip install zstandard), or decompress it with `zstd -d`") from None
    import io

    raw = open(path, "rb")
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True),
                             1 << 20)


def _decode_errors() -> tuple:
    errors = [OSError, EOFError, lzma.LZMAError]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def byte_ranges(path: str, split_bytes: int) -> list[tuple[int, int]]:
    """[start, end) ranges of about split_bytes covering a plain file; one range
    (0, -1) for a compressed or small one (-1: to the end)."""
    size = os.path.getsize(path)
    if split_bytes <= 0 or size <= split_bytes or compression(path) is not None:
        return [(0, -1)]
    n = -(-size // split_bytes)
    cuts = [size * i // n for i in range(n + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(n)]


class Where:
    """'metadata FILE:LINE' of a line of a byte range, formatted only when printed: the
    line number of a range that starts mid-file costs a count of the newlines before it."""

    __slots__ = ("src", "k")

    def __init__(self, src: "Lines", k: int):
        self.src, self.k = src, k

    def __str__(self) -> str:
        return f"metadata {self.src.path}:{self.src.first_line() + self.k}"


class Lines:
    """Iterates (Where, text) over the lines that start in [start, end) of `path`,
    without their line ends; blank lines included. Text that is not UTF-8, and a
    compressed stream that breaks, raise ValueError naming the file, the line and a fix."""

    def __init__(self, path: str, start: int = 0, end: int = -1):
        self.path, self.start, self.end = path, start, end
        self.kind = compression(path)
        self._first_pos = start  # where the range's first whole line starts
        self._first: Optional[int] = None

    def first_line(self) -> int:
        if self._first is None:
            n = 1
            with open(self.path, "rb") as f:
                left = self._first_pos
                while left > 0:
                    block = f.read(min(left, 1 << 24))
                    if not block:
                        break
                    n += block.count(b"\n")
                    left -= len(block)
            self._first = n
        return self._first

    def __iter__(self) -> Iterator[tuple[Where, str]]:
        errors = _decode_errors()
        k = -1
        with _open(self.path, self.kind) as f:
            pos = self.start
            if pos > 0:  # the rest of the line under way at start-1 (just its "\n" at a line start) is the range before's
                f.seek(pos - 1)
                pos += len(f.readline()) - 1
            self._first_pos = pos
            while self.end < 0 or pos < self.end:
                try:
                    raw = f.readline()
                except errors as e:
                    raise ValueError(
                        f"{Where(self, k + 1)}: the {self.kind} stream breaks here ({e}): the file is truncated or "
                        f"corrupt; download it again (`{_TEST[self.kind]} {self.path}` checks it)") from None
                if not raw:
                    break
                pos += len(raw)
                k += 1
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(self._not_utf8(Where(self, k), raw, e)) from None
                yield Where(self, k), text.rstrip("\r\n")

    def _not_utf8(self, where: Where, raw: bytes, e: UnicodeDecodeError) -> str:
        msg = f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
        binary = sum(b < 9 or 13 < b < 32 for b in raw[:512])
        if self.kind is None and where.k == 0 and binary > 8:
            return (msg + "; the file looks binary: if it is compressed in a format other than gzip, bz2, xz or "
                    "zstd (zip, 7z, lz4), decompress it first")
        return (msg + "; metadata must be UTF-8: convert the file, e.g. `iconv -f WINDOWS-1252 -t UTF-8 "
                f"{self.path} > {os.path.basename(self.path)}.utf8` when it is Latin-1 / Windows-1252")
