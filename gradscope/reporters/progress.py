"""A one-line progress display on stderr while steps run: step i/N, loss, grad norm, time left.

Only on a terminal: a log file or a CI job gets nothing (``enabled`` says which), since a line
rewritten with carriage returns is noise there.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import IO

from gradscope.report import Report, StepRecord

_CLEAR = "\r\x1b[K"  # back to the line's start, and erase it


class ProgressReporter:
    """Rewrites one line of ``stream`` per measured step; erases it when the report is written.

    Args:
        total: the steps the run will take.
        stream: where the line goes (stderr).
        clock: seconds, for the estimate of the time left (a test passes its own).
    """

    def __init__(self, total: int, stream: IO[str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.stream, self.clock = total, stream or sys.stderr, clock
        self.start = clock()
        self.shown = False

    @staticmethod
    def enabled(stream: IO[str] | None = None) -> bool:
        """Whether ``stream`` (stderr) is a terminal."""
        stream = stream or sys.stderr
        return hasattr(stream, "isatty") and stream.isatty()

    def on_step(self, record: StepRecord) -> None:
        done = record.step + 1
        self.stream.write(_CLEAR + line(done, self.total, record, self.clock() - self.start))
        self.stream.flush()
        self.shown = True

    def write(self, report: Report) -> None:
        self._erase()

    def close(self) -> None:
        self._erase()

    def _erase(self) -> None:
        if self.shown:
            self.stream.write(_CLEAR)
            self.stream.flush()
            self.shown = False


def line(done: int, total: int, record: StepRecord, elapsed: float) -> str:
    """``step 12/50  loss 2.31  grad norm 1.05  ~18s left``."""
    parts = [f"step {done}/{total}", f"loss {_num(record.loss)}", f"grad norm {_num(record.grad_norm_total)}"]
    if 0 < done < total:
        parts.append(f"~{_duration(elapsed / done * (total - done))} left")
    return "gradscope: " + "  ".join(parts)


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"
