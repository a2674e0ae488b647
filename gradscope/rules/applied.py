"""The update each step applied, and what followed it: ``exploding_gradient`` and ``dead_relu``
judge a large gradient by these, not by one step's |grad|/|weight| against a constant.

An update's size is measured where it can be: the ``update_ratio`` probe's |delta w|/|w| at the
next measured step is the update the step made. Otherwise it is the plain SGD step the gradient
asks for: lr x |grad|/|weight|, times the coefficient the step's clipping applied
(``clip_grad_norm_`` scales every gradient by it); momentum makes the real step larger. Adam-family
optimizers normalise the gradient, so their steps are not estimated from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gradscope.report import Report, StepRecord, tables
from gradscope.rules.common import clean_steps, loss_is_bad, nonfinite_step

# Optimizers whose update does not scale with the gradient (per-element normalised steps):
# a constant factor on the loss, or a huge |grad|/|weight|, changes nothing they do.
SCALE_FREE = ("adam", "adagrad", "adadelta", "rmsprop", "adafactor", "lion", "lamb", "sophia", "came")
REFERENCE_LR = 0.01  # what ``exploding_gradient.relative`` assumes when the learning rate is not known
LOSS_GROWTH = 1.5  # the later losses' median this many times the loss at the step: the update hurt
GRAD_GROWTH = 10.0  # a later gradient norm this many times the step's: the update made them grow
LATER = 3  # the steps right after whose losses are compared with the step's


@dataclass(frozen=True)
class Update:
    """One weight's update at one step, relative to the weight's norm."""

    name: str
    ratio: float  # |delta w| / |w|
    gradient: float  # |grad| / |w| at the step, before clipping
    coefficient: float  # what clipping multiplied the gradient by (1.0: not clipped)
    measured: bool  # from the update_ratio probe rather than lr x |grad|/|w|


def scale_free(report: Report) -> bool:
    """The optimizer normalises the gradient (Adam and kin): its steps do not follow the gradient's size."""
    optimizer = (report.run.optimizer or "").lower()
    return any(name in optimizer for name in SCALE_FREE)


def updates(report: Report, step: StepRecord, names: list[str]) -> list[Update]:
    """The update each named weight got at ``step``, largest first (empty for a scale-free optimizer)."""
    if scale_free(report):
        return []
    lr = report.run.lr if report.run.lr is not None else REFERENCE_LR
    coefficient = step.clip_coefficient if step.clip_coefficient is not None else 1.0
    measured = _measured(report, step)
    out = []
    for name, ratio in tables.grad_to_param(step.parameters, names):
        if name in measured:
            out.append(Update(name, measured[name], ratio, coefficient, True))
        else:
            out.append(Update(name, lr * coefficient * ratio, ratio, coefficient, False))
    return sorted(out, key=lambda u: -u.ratio)


def _measured(report: Report, step: StepRecord) -> dict[str, float]:
    """The update_ratio probe's reading of the update made at ``step`` (recorded at the next step)."""
    after = next((s for s in report.steps if s.step == step.step + 1), None)
    values = after.probes.get("update_ratio", {}) if after is not None else {}
    return {n: v for n, v in values.items() if math.isfinite(v)}


@dataclass(frozen=True)
class Aftermath:
    """What the steps after one step show."""

    steps: int  # later steps measured
    loss: float | None  # the loss at the step
    later_loss: float | None  # the median of the first LATER finite losses after it
    compared: int  # how many losses that median took
    nonfinite: int | None  # the first later step with a NaN/Inf loss or gradient
    grad_growth: float | None  # the largest total gradient norm of the LATER steps after, over the step's
    failed: str | None  # the run raised after the step (its error)
    died: tuple[str, int, float] | None = None  # a ReLU alive at the step, mostly dead at the end: (module, step, dead)

    @property
    def fell(self) -> bool:
        return self.loss is not None and self.later_loss is not None and self.later_loss < self.loss

    def harm(self) -> str | None:
        """What went wrong after the step, in words; None when nothing did."""
        found = []
        if self.nonfinite is not None:
            found.append(f"the loss or the gradients became NaN/Inf at step {self.nonfinite}")
        elif self.failed is not None:
            found.append(f"the run then raised ({self.failed})")
        if self.died is not None:
            module, at, dead = self.died
            found.append(f"units of {module} died ({dead:.0%} of them dead from step {at} on)")
        if self.loss is not None and self.later_loss is not None and self.later_loss > LOSS_GROWTH * self.loss:
            found.append(f"the loss rose from {self.loss:.4g} to {self.later_loss:.4g}")
        if self.grad_growth is not None and self.grad_growth > GRAD_GROWTH:
            found.append(f"the gradient norm grew {self.grad_growth:.3g}x")
        return "; ".join(found) or None


def aftermath(report: Report, step: StepRecord) -> Aftermath:
    """The consequences of ``step``'s update across the steps after it."""
    later = [s for s in report.steps if s.step > step.step]
    clean = [s for s in clean_steps(report) if s.step > step.step]
    # The losses right after the step: what its update did, before later updates add their own.
    losses = [s.loss for s in clean if s.loss is not None and math.isfinite(s.loss)][:LATER]
    bad = next((s.step for s in later if nonfinite_step(s) or loss_is_bad(s)), None)
    norms = [s.grad_norm_total for s in clean[:LATER] if math.isfinite(s.grad_norm_total)]
    growth = max(norms) / step.grad_norm_total if norms and step.grad_norm_total > 0 else None
    failed = report.run.error.split(":")[0] if report.run.status == "failed" and report.run.error else None
    return Aftermath(
        steps=len(later),
        loss=step.loss if step.loss is not None and math.isfinite(step.loss) else None,
        later_loss=_median(losses) if losses else None,
        compared=len(losses),
        nonfinite=bad,
        grad_growth=growth,
        failed=failed,
        died=_died(step, clean),
    )


DEAD = 0.5  # a ReLU with this share of its units dead in every later step has died


def _died(step: StepRecord, later: list[StepRecord]) -> tuple[str, int, float] | None:
    """The first ReLU that was mostly alive at ``step`` and mostly dead in every later clean step."""
    if not later:
        return None
    for site, a in step.activations.items():
        if a.kind != "relu" or a.fraction >= DEAD:
            continue
        series = [s.activations.get(site) for s in later]
        if all(b is not None and b.fraction >= DEAD for b in series):
            return a.module, later[0].step, min(b.fraction for b in series)  # type: ignore[union-attr]
    return None


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
