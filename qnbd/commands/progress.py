"""qemu-img -p style progress on stderr ("    (12.34/100%)"), for long operations on a
terminal. Engines only count (qnbd/block/check_result.py, Progress); drawing is here."""

import sys

from ..block.check_result import Progress


class ProgressBar(Progress):
    def __init__(self, enabled: bool = True, min_total: int = 1024):
        """Drawn only on a terminal, and only for work of at least `min_total` steps:
        a quick operation prints nothing, as with qemu-img."""
        self.enabled = enabled and sys.stderr.isatty()
        self.min_total = min_total
        self.total = 0
        self.current = 0
        self.shown = -1

    def add_total(self, n: int) -> None:
        self.total += n

    def step(self) -> None:
        self.current += 1
        if self.enabled and self.total >= self.min_total:
            percent = int(self.current * 10000 / self.total)
            if percent != self.shown:
                self.shown = percent
                sys.stderr.write(f"\r    ({percent / 100:.2f}/100%)")
                sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.shown >= 0:
            sys.stderr.write("\n")
            self.shown = -1
