"""A one-line progress bar on stderr: done/total, failures, elapsed time. Redrawn in place on a
terminal; elsewhere (a log, a test's pipe) one line per tenth of the run. Called on the runner's
loop only."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from bench.serving.metrics import RequestRecord

WIDTH = 30


class Progress:
    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = self.stream.isatty()
        self.num_done = 0
        self.num_failed = 0
        self.started = time.perf_counter()
        self._last_tenth = -1

    def update(self, record: RequestRecord) -> None:
        self.num_done += 1
        self.num_failed += not record.is_ok
        tenth = 10 * self.num_done // self.total
        if self.is_tty:
            self.stream.write("\r" + self.line())
            self.stream.flush()
        elif tenth != self._last_tenth:
            self._last_tenth = tenth
            self.stream.write(self.line() + "\n")

    def close(self) -> None:
        if self.is_tty:
            self.stream.write("\n")
        self.stream.flush()

    def line(self) -> str:
        filled = min(WIDTH, WIDTH * self.num_done // self.total)
        bar = "#" * filled + "." * (WIDTH - filled)
        elapsed = time.perf_counter() - self.started
        return (
            f"{self.label} [{bar}] {self.num_done}/{self.total} "
            f"failed {self.num_failed} {elapsed:.1f} s"
        )
