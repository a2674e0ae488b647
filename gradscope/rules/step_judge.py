"""The findings of one step as it is recorded: which steps a long run keeps in full, and the
finding ``raise_on`` stops the loop at, before the optimizer updates the weights (a loss or
gradient spike included, judged against the steps before it as OLMo-core's and Megatron's checks do)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from gradscope import rules
from gradscope.config import Checks
from gradscope.report import SEVERITIES, Anomaly, Report, StepRecord


class History(Protocol):
    """The steps before the one judged (``observe.history.History``)."""

    def first(self, loss: bool, count: int) -> list[float]: ...

    def recent(self, loss: bool, count: int) -> list[float]: ...

    def steps(self) -> tuple[StepRecord, ...]: ...


class StepJudge:
    """Judges single steps by the rules (``checks``); ``single(record)`` is the report of that step alone."""

    def __init__(self, checks: Checks, single: Callable[[StepRecord], Report]) -> None:
        self.checks, self.single = checks, single
        self._last: tuple[StepRecord, list[Anomaly]] | None = None  # the last record's spikes

    def has_finding(self, record: StepRecord, history: History) -> bool:
        """The record shows a finding of its own, or spikes against the steps of ``history`` before it."""
        return bool(rules.step_findings(self.single(record), self.checks) or self.spikes(record, history))

    def spikes(self, record: StepRecord, history: History) -> list[Anomaly]:
        """The record's loss and gradient-norm spikes against the steps of ``history`` before it (judged
        once per record: ``raise_on`` and the choice of steps to keep both ask)."""
        if self._last is not None and self._last[0] is record:
            return self._last[1]
        found = []
        for kind, value in (("loss_spike", record.loss), ("gradient_spike", record.grad_norm_total)):
            check = self.checks.rule(kind)
            if value is None or check.severity == "off":
                continue
            window = history.recent(kind == "loss_spike", check.window)
            scale = rules.early_scale(history.first(kind == "loss_spike", check.window), check)
            spike = rules.spike_against(window, record.step, value, check, scale)
            if spike is not None:
                found.append(rules.spike_finding(kind, spike, record, list(history.steps()), check))
        self._last = (record, found)
        return found

    def worst(self, record: StepRecord, floor: str, spikes: list[Anomaly]) -> Anomaly | None:
        """The most severe finding of the step (``spikes``: its spikes) at ``floor`` severity or above, or None."""
        found, _ = rules.settle([*rules.findings(self.single(record), self.checks), *spikes], self.checks)
        worst = [a for a in found if SEVERITIES.index(a.severity) >= SEVERITIES.index(floor)]
        return worst[0] if worst else None
