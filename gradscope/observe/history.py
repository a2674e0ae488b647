"""Which steps a long run keeps in full, and the running totals that stand for the rest.

A ``StepRecord`` holds a row per parameter (about 0.6 KB per parameter tensor), so a run of
100,000 steps cannot keep them all. ``History`` keeps in full: the first ``first`` steps, each
step with a finding together with the ``before`` steps that led to it (up to ``findings`` such
steps), a sparse sample of the rest (at most ``sampled`` steps, the stride doubling whenever the
sample fills) and the last step. Of every step it keeps the compact ``StepSeries`` row (loss,
total norm, clip coefficient, loss scale, flags: 48 bytes) and the running totals that the
rules looking across steps need (which parameters ever got a gradient, which
steps were clipped). Everything measured can also be streamed, step by step, as JSON Lines.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from gradscope.report import Retained, RunTotals, StepRecord, StepSeries, tables
from gradscope.report.stats import clean, fully_dead, median


@dataclass(frozen=True)
class Retention:
    """How many steps the in-memory report keeps in full (see the module's docstring).

    Attributes:
        first: the first steps, always kept.
        before: steps kept before each step with a finding (the run-up to it).
        findings: steps with a finding kept at most (the first ones; later ones only in totals).
        sampled: steps of the sparse sample kept at most.
        every: the sample's first stride; it doubles each time the sample fills.
    """

    first: int = 16
    before: int = 8
    findings: int = 64
    sampled: int = 64
    every: int = 64

    def __post_init__(self) -> None:
        for name in ("first", "before", "findings", "sampled", "every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "every" else 0):
                low = 1 if name == "every" else 0
                raise ValueError(f"retention.{name} must be an integer >= {low}, got {value!r}")

    @property
    def bound(self) -> int:
        """The most steps kept in full, however long the run."""
        return self.first + self.findings * (self.before + 1) + self.sampled + 1


@dataclass
class _Totals:
    """Running totals over every step (see ``report.RunTotals``)."""

    steps: int = 0
    received: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    clean: int = 0
    finite: int = 0
    clipped: list[tuple[int, float, float]] = field(default_factory=list)  # (step, pre-clip norm, coefficient)
    clipped_count: int = 0
    skipped: int = 0
    coefficients: array = field(default_factory=lambda: array("d"))
    fully_dead: bool = False

    CLIPPED_LISTED = 64  # clipped steps listed by number; the rest counted


class _Series:
    """``StepSeries`` columns as arrays of machine numbers (NaN stands for None)."""

    def __init__(self) -> None:
        self.step = array("q")
        self.loss, self.norm, self.coefficient, self.scale = array("d"), array("d"), array("d"), array("d")
        self.clean = array("b")

    def append(self, record: StepRecord) -> None:
        self.step.append(record.step)
        self.loss.append(_nan(record.loss))
        self.norm.append(record.grad_norm_total)
        self.coefficient.append(_nan(record.clip_coefficient))
        self.scale.append(_nan(record.loss_scale))
        self.clean.append(clean(record))

    def frozen(self) -> StepSeries:
        return StepSeries(
            step=tuple(self.step),
            loss=tuple(_none(v) for v in self.loss),  # a NaN loss recorded as such reads back as None
            grad_norm_total=tuple(self.norm),
            clip_coefficient=tuple(_none(v) for v in self.coefficient),
            loss_scale=tuple(_none(v) for v in self.scale),
            clean=tuple(bool(c) for c in self.clean),
        )


class History:
    """The steps of a run: the kept records, every step's series row, and running totals.

    Args:
        retention: how many steps to keep in full.
        judge: tells whether a record has a finding of its own (nothing looking across steps).
    """

    def __init__(self, retention: Retention | None = None, judge: Callable[[StepRecord], bool] | None = None) -> None:
        self.retention = retention or Retention()
        self.judge = judge or (lambda record: False)
        self.kept: dict[int, StepRecord] = {}
        self.series = _Series()
        self._recent: deque[StepRecord] = deque(maxlen=self.retention.before)
        self._findings = 0
        self._sample: list[int] = []
        self._stride = self.retention.every
        self._last: StepRecord | None = None
        self._totals = _Totals()

    def __len__(self) -> int:
        return self._totals.steps

    def add(self, record: StepRecord) -> None:
        """Take in one step: its series row, the totals, and the record itself if it is kept."""
        r = self.retention
        if self._last is not None and self._last.step not in self.kept:
            self._recent.append(self._last)
        self._last = record
        if record.step < r.first or len(self.kept) < r.first:
            self.kept[record.step] = record
        elif self._findings < r.findings and (_flagged(record) or self.judge(record)):
            self._findings += 1
            for earlier in self._recent:
                self.kept[earlier.step] = earlier
            self._recent.clear()
            self.kept[record.step] = record
        elif record.step % self._stride == 0:
            self._sampled(record)
        self.series.append(record)  # after the judge, whose window is the steps before this one
        self._count(record)

    def first(self, loss: bool, count: int) -> list[float]:
        """The loss (or total gradient norm) of the first ``count`` clean steps."""
        column = self.series.loss if loss else self.series.norm
        out: list[float] = []
        for i in range(len(column)):
            if len(out) == count:
                break
            if self.series.clean[i] and not math.isnan(column[i]):
                out.append(column[i])
        return out

    def recent(self, loss: bool, count: int) -> list[float]:
        """The loss (or total gradient norm) of the last ``count`` clean steps, oldest first."""
        column = self.series.loss if loss else self.series.norm
        out: list[float] = []
        for i in range(len(column) - 1, -1, -1):
            if len(out) == count:
                break
            if self.series.clean[i] and not math.isnan(column[i]):
                out.append(column[i])
        return out[::-1]

    def _sampled(self, record: StepRecord) -> None:
        self.kept[record.step] = record
        self._sample.append(record.step)
        if len(self._sample) > self.retention.sampled:
            self._stride *= 2  # keep every other sampled step from now on, and thin those kept
            for step in [s for s in self._sample if s % self._stride]:
                self.kept.pop(step, None)
            self._sample = [s for s in self._sample if s % self._stride == 0]

    def steps(self) -> tuple[StepRecord, ...]:
        """The records kept in full, and the last one, in step order."""
        kept = dict(self.kept)
        if self._last is not None:
            kept[self._last.step] = self._last
        return tuple(kept[s] for s in sorted(kept))

    def retained(self) -> Retained:
        """What the report says of the steps kept in full, and of every step."""
        kept = tuple(r.step for r in self.steps())
        return Retained(kept, asdict(self.retention), self.totals(), self.series.frozen(), self._stride)

    def totals(self) -> RunTotals:
        t = self._totals
        return RunTotals(
            steps=t.steps,
            clean_steps=t.clean,
            finite_steps=t.finite,
            received=tuple(sorted(t.received)),
            missing=tuple(sorted(t.missing)),
            clipped_steps=t.clipped_count,
            skipped_steps=t.skipped,
            clipped=tuple(t.clipped),
            clip_coefficient_median=median(t.coefficients) if t.coefficients else None,
            fully_dead=t.fully_dead,
        )

    def _count(self, record: StepRecord) -> None:
        t = self._totals
        t.steps += 1
        t.skipped += bool(record.skipped and record.origin is None)
        got = tables.received(record.parameters)
        if record.backward_error is None:
            t.received.update(got)
            t.received.update(record.cleared)  # arrived in backward, cleared before the step
        if math.isfinite(record.grad_norm_total):
            t.finite += 1
            coefficient = record.clip_coefficient
            if coefficient is not None and coefficient < 1.0:
                t.clipped_count += 1
                t.coefficients.append(coefficient)
                if len(t.clipped) < t.CLIPPED_LISTED:
                    pre = record.clip_norm if record.clip_norm is not None else record.grad_norm_total
                    t.clipped.append((record.step, pre, coefficient))
        if clean(record):
            t.clean += 1
            t.fully_dead = t.fully_dead or fully_dead(record)
            arrived = set(got)
            t.missing.update(name for name in record.parameters if name not in arrived)
            t.missing.update(record.cleared)  # the optimizer got none: not a gradient that flows as zero
            lost = record.underflow or {}
            t.missing.update(name for name, fraction in lost.items() if fraction > 0 and name in record.parameters)


def _flagged(record: StepRecord) -> bool:
    """A step that is a finding's evidence by itself: a NaN/Inf, an error, a skip, stale gradients."""
    bad = record.loss is not None and not math.isfinite(record.loss)
    bad = bad or not math.isfinite(record.grad_norm_total)
    flags = (record.backward_error, record.origin, record.skipped, record.stale, record.cleared, record.underflow)
    return bad or any(bool(f) for f in flags)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _none(value: float) -> float | None:
    return None if math.isnan(value) else value
