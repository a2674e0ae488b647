"""Ctrl-C and SIGTERM (CI cancellation, ``timeout``, ``docker stop``) stop a run the same way: the
first raises ``KeyboardInterrupt`` where the run is, so the steps measured so far are reported;
any later one waits for the report to be written instead of tearing the process down mid-write."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)


class Interrupts:
    """While active, the first SIGINT or SIGTERM raises ``KeyboardInterrupt``; later ones are held.

    ``writing()`` marks the stretch where the report is written: a signal there is held too, and
    ``pending`` tells the caller one came.
    """

    def __init__(self) -> None:
        self.count = 0
        self.holding = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def hold(self) -> None:
        """From now on, signals are counted, not raised (the report is being written)."""
        self.holding = True

    @property
    def pending(self) -> bool:
        return self.count > 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.holding or self.count > 1:
            return  # the first one is already stopping the run; the report is being written
        raise KeyboardInterrupt
