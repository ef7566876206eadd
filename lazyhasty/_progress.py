"""A dependency-free progress bar on stderr (shown only when asked for, or on a terminal)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None):
        self.total, self.desc, self.enabled = max(1, total), desc, enabled
        self.stream = stream or sys.stderr
        self.n, self.t0, self.last, self.postfix = 0, time.perf_counter(), 0.0, ""
        # not a terminal (a CI log, a file): a plain line per ~10% or 30 s, never carriage returns
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.next_frac = 0.1

    def update(self, k: int = 1, postfix: str | None = None) -> None:
        self.n += k
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        if self.enabled and not self.tty:
            frac = min(1.0, self.n / self.total)
            if frac >= self.next_frac or now - self.last > 30 or self.n >= self.total:
                self.last = now
                self.next_frac = (int(frac * 10) + 1) / 10
                self.stream.write(f"{self.desc} {self.n}/{self.total} {now - self.t0:.0f}s {self.postfix}\n")
                self.stream.flush()
            return
        if self.enabled and (now - self.last > 0.2 or self.n >= self.total):
            self.last = now
            frac = min(1.0, self.n / self.total)
            bar = "#" * int(24 * frac)
            el = now - self.t0
            eta = el / frac - el if frac > 0 else 0.0
            self.stream.write(f"\r{self.desc} [{bar:<24}] {self.n}/{self.total} {el:.0f}s<{eta:.0f}s {self.postfix}  ")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
