"""The findings of one step as it is recorded: which steps a long run keeps in full, and the
finding ``raise_on`` stops the loop at, before the optimizer updates the weights (a loss or
gradient spike included, judged against the steps before it as OLMo-core's and Megatron's checks do)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from gradscope import rules
from gradscope.config import Checks
from gradscope.report import SEVERITIES, Anomaly, LoopFacts, Report, StepRecord

LOOP_AFTER = 3  # steps before the loop's findings are judged mid-run (a warm-up's first lr is 0)


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
        self._own: tuple[StepRecord, list[Anomaly]] | None = None  # the last record's own findings

    def has_finding(self, record: StepRecord, history: History) -> bool:
        """The record shows a finding of its own, or spikes against the steps of ``history`` before it."""
        return bool(self.own(record) or self.spikes(record, history))

    def own(self, record: StepRecord) -> list[Anomaly]:
        """The findings of the rules that judge the step by itself (judged once per record)."""
        if self._own is None or self._own[0] is not record:
            self._own = (record, rules.step_findings(self.single(record), self.checks))
        return self._own[1]

    def settled(self, record: StepRecord, spikes: list[Anomaly]) -> list[Anomaly]:
        """The step's own findings and ``spikes``, with the config's severities, less those it accepts."""
        return list(rules.settle([*self.own(record), *spikes], self.checks)[0])

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

    def of_loop(self, record: StepRecord, loop: LoopFacts | None) -> list[Anomaly]:
        """The loop's findings so far (``loop``: what the watch saw of it up to ``record``), settled, once
        ``LOOP_AFTER`` steps tell a warm-up that starts at lr 0 from a run stuck there."""
        if loop is None or loop.checked < LOOP_AFTER:
            return []
        single = self.single(record)
        report = replace(single, run=replace(single.run, loop=loop))
        return list(rules.settle(rules.loop_findings(report, self.checks), self.checks)[0])

    def worst(self, record: StepRecord, floor: str, spikes: list[Anomaly]) -> Anomaly | None:
        """The most severe finding of the step (``spikes``: its spikes) at ``floor`` severity or above, or None."""
        found, _ = rules.settle([*rules.findings(self.single(record), self.checks), *spikes], self.checks)
        worst = [a for a in found if SEVERITIES.index(a.severity) >= SEVERITIES.index(floor)]
        return worst[0] if worst else None
