"""A tiny progress bar on stderr (no tqdm): a redrawn line on a terminal, an
occasional plain line otherwise (CI logs), nothing when disabled."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None, initial: int = 0):
        self.total = max(int(total), 0)
        self.desc = desc
        self.n = self.initial = int(initial)  # initial: done before (a resumed build), not in the rate
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self._interval = 0.2 if self.tty else 10.0
        self._last = 0.0 if self.tty else self.start  # logs: a line every 10 s, and the last one
        self._closed = False
        self.note = ""  # appended to the line, e.g. rejected images so far by reason

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if self.enabled and now - self._last >= self._interval:
            self._last = now
            self._draw(now)

    def _draw(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = (self.n - self.initial) / elapsed
        if self.total:
            frac = min(self.n / self.total, 1.0)
            width = 24
            bar = "#" * int(frac * width) + "." * (width - int(frac * width))
            eta = (self.total - self.n) / rate if rate > 0 and not final else 0.0
            line = f"{self.desc} [{bar}] {self.n}/{self.total} {rate:.1f}/s " + (
                f"{elapsed:.1f}s" if final else f"eta {eta:.0f}s"
            )
        else:
            line = f"{self.desc} {self.n} {rate:.1f}/s {elapsed:.1f}s"
        if self.note:
            line += " | " + self.note
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._draw(time.monotonic(), final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
