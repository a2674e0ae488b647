"""Reporters read a finished (or partial) report and write it somewhere.

Every reporter has ``on_step(step)`` (called as each step is measured; most do nothing there),
``write(report)`` and ``close()``. ``build_reporters`` makes the ``Reporters`` of a run from its
``Outputs``, and decides who writes: in a distributed run every rank computes the same report
and rank 0 alone writes it. The CLI, ``gradscope.watch`` and the trainer callbacks all build
their reporters here; a new reporter is its own module plus one line in ``_make``.
"""

from __future__ import annotations

from typing import Protocol

from gradscope.config.outputs import Outputs  # re-exported: `from gradscope.reporters import Outputs`
from gradscope.errors import GradscopeError
from gradscope.report import Anomaly, Report, StepRecord

__all__ = ["Outputs", "Reporter", "Reporters", "WriteFailures", "build_reporters"]


class Reporter(Protocol):
    def on_step(self, step: StepRecord) -> None: ...

    def write(self, report: Report) -> None: ...

    def close(self) -> None: ...


class WriteFailures(GradscopeError):
    """Several outputs failed; each is named."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        super().__init__("; ".join(str(f) for f in failures))


class Reporters:
    """The reporters of one run, called together, in the order they were built."""

    def __init__(self, reporters: list[Reporter] | None = None) -> None:
        self.reporters = list(reporters or [])

    def __len__(self) -> int:
        return len(self.reporters)

    def on_step(self, step: StepRecord) -> None:
        for reporter in self.reporters:
            reporter.on_step(step)

    @property
    def listening(self) -> bool:
        """Some reporter takes the findings of each step as they appear (``found``)."""
        return any(hasattr(r, "found") for r in self.reporters)

    def found(self, anomalies: list[Anomaly]) -> None:
        """A step's findings, to the reporters that take them as they appear."""
        for reporter in self.reporters:
            if hasattr(reporter, "found"):
                reporter.found(anomalies)

    def write(self, report: Report) -> None:
        """Write the report with each reporter, closing each after it has written; one that fails
        does not stop the others (its error is raised once they are all done)."""
        failures: list[Exception] = []
        for reporter in self.reporters:
            try:
                reporter.write(report)
                reporter.close()
            except Exception as exc:
                failures.append(exc)
        if failures:
            raise failures[0] if len(failures) == 1 else WriteFailures(failures)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()


def build_reporters(outputs: Outputs, rank: int | None = None) -> Reporters:
    """The reporters ``outputs`` asks for; none on a rank other than 0 (``rank``: None when not distributed).

    Raises:
        GradscopeError: a reporter cannot be made (matplotlib missing for the picture).
    """
    if rank is not None and rank != 0:
        return Reporters()  # every rank computes the same report: one writes it
    return Reporters(_make(outputs))


def _make(outputs: Outputs) -> list[Reporter]:
    # Each reporter's module is imported only when asked for (rich, matplotlib, tensorboard are heavy).
    made: list[Reporter] = []
    if outputs.progress:
        from gradscope.reporters.progress import ProgressReporter

        made.append(ProgressReporter(outputs.progress))  # first: its line is erased before the report prints
    if outputs.terminal is not None:
        from gradscope.reporters.terminal import TerminalReporter

        made.append(TerminalReporter(outputs.terminal, outputs.show_all))
    if outputs.plot:
        from gradscope.reporters.plot import PlotReporter

        made.append(PlotReporter(outputs.plot))
    if outputs.json:
        from gradscope.reporters.json import JsonReporter

        made.append(JsonReporter(outputs.json))
    if outputs.jsonl:
        from gradscope.reporters.jsonl import JsonlReporter

        made.append(JsonlReporter(outputs.jsonl))
    if outputs.csv:
        from gradscope.reporters.csv import CsvReporter

        made.append(CsvReporter(outputs.csv))
    if outputs.junit:
        from gradscope.reporters.ci import JunitReporter

        made.append(JunitReporter(outputs.junit, outputs.fail_on, baseline=outputs.compared, checks=outputs.checks))
    if outputs.logdir:
        from gradscope.reporters.tensorboard import TensorBoardReporter

        made.append(TensorBoardReporter(outputs.logdir, outputs.config_text))
    if outputs.github:
        from gradscope.reporters.ci import GithubReporter

        made.append(GithubReporter(outputs.config_source))
    if outputs.baseline:
        from gradscope.reporters.json import JsonReporter

        made.append(JsonReporter(outputs.baseline, "--update-baseline"))
    if outputs.speak:
        from gradscope.reporters.logs import LogReporter

        made.append(LogReporter(outputs.say))
    return made
