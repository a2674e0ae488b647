"""A watch that speaks: each kind of finding said once, at the step it first appears, and a one-line
summary when the watch closes, through Python's ``logging`` (the ``gradscope`` logger) or a host
trainer's own channel (Lightning's ``rank_zero_warn``, transformers' logger).

The watch judges; this only words what it is handed (``found``, then the report at ``write``). Made
by ``build_reporters`` when ``Outputs.speak``, so on rank 0 alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gradscope.report import Anomaly, Report, StepRecord

LOGGER = logging.getLogger("gradscope")
LEVELS = {"error": logging.ERROR, "warning": logging.WARNING}

Say = Callable[[int, str], None]  # (logging level, text)


class LogReporter:
    """Says findings of warning or error severity, each kind once (the first), and a summary.

    Args:
        say: where the words go: ``say(level, text)``; the ``gradscope`` logger by default.
    """

    def __init__(self, say: Say | None = None) -> None:
        self.say: Say = say or LOGGER.log
        self.heard: set[str] = set()

    def found(self, anomalies: list[Anomaly] | tuple[Anomaly, ...]) -> None:
        """Say each finding whose kind has not been said yet (warnings and errors only)."""
        for a in anomalies:
            if a.severity in LEVELS and a.kind not in self.heard:
                self.heard.add(a.kind)
                self.say(LEVELS[a.severity], finding_line(a))

    def on_step(self, step: StepRecord) -> None:
        return None  # the watch hands each step's findings to ``found``

    def write(self, report: Report) -> None:
        """The findings not said yet, then one line: the steps watched and the findings by severity."""
        self.found(report.anomalies)
        self.say(logging.WARNING if self.heard else logging.INFO, summary_line(report))

    def close(self) -> None:
        return None


def finding_line(a: Anomaly) -> str:
    """``gradscope: step 3: error nonfinite_loss at 4: <message>``."""
    step = f"step {a.step}: " if a.step is not None else ""
    where = a.module or a.parameter
    return f"gradscope: {step}{a.severity} {a.kind}{f' at {where}' if where else ''}: {a.message}"


def summary_line(report: Report) -> str:
    """One line for the end of a watch: steps, and each kind found with its count, worst first."""
    steps = report.retained.totals.steps if report.retained is not None else len(report.steps)
    found = [a for a in report.anomalies if a.severity in LEVELS]
    if not found:
        info = len(report.anomalies)
        return f"gradscope: {steps} steps watched, no warnings or errors{f' ({info} info)' if info else ''}."
    counts: dict[tuple[str, str], int] = {}
    for a in found:
        counts[(a.severity, a.kind)] = counts.get((a.severity, a.kind), 0) + 1
    kinds = ", ".join(f"{severity} {kind}{f' x{n}' if n > 1 else ''}" for (severity, kind), n in counts.items())
    return (
        f"gradscope: {steps} steps watched, {len(found)} finding(s): {kinds}; "
        f"scope.report.print() (or the JSON report) has their causes and fixes."
    )
