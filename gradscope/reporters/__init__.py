"""Reporters read a finished (or partial) report and write it somewhere.

Each has ``write(report)`` and ``close()``; one that streams (TensorBoard)
also has ``on_step(step)``, called as each step is measured.
"""

from typing import Protocol

from gradscope.report import Report


class Reporter(Protocol):
    def write(self, report: Report) -> None: ...

    def close(self) -> None: ...
