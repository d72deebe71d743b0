"""A progress bar on stderr for long sweeps: redrawn in place on a terminal, a line per tenth of the
work otherwise (logs stay short)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .row import Row

WIDTH = 30


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None):
        self.total = max(1, total)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self.interactive = self.stream.isatty()
        self._last_tenth = 0

    def __call__(self, row: Row) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        filled = WIDTH * self.done // self.total
        text = (
            f"[{'#' * filled}{'.' * (WIDTH - filled)}] {self.done}/{self.total} "
            f"{elapsed:.0f}s, ~{eta:.0f}s left: {row.provider} {row.op} L={row.seq_q} {row.mode}"
        )
        if self.interactive:
            end = "\n" if self.done >= self.total else ""
            print(f"\r{text[:120]:<120}", end=end, file=self.stream, flush=True)
            return
        tenth = 10 * self.done // self.total
        if tenth > self._last_tenth:
            self._last_tenth = tenth
            print(text, file=self.stream, flush=True)
