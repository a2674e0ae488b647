"""Pure reductions of probe readings into report statistics (host-side, plain floats)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

from gradscope.report.report import StepRecord
from gradscope.report.rows import EXTRA_NORM, GRAD_MAX_ABS, GRAD_NORM, Readings
from gradscope.report.tables import NO_GRADIENT, Layout, ModuleTable, ParamTable

__all__ = [
    "NO_GRADIENT",
    "clean",
    "clip_norm",
    "combine_norms",
    "fully_dead",
    "median",
    "module_stats",
    "parameter_stats",
    "total_norm",
]


def parameter_stats(layout: Layout, readings: Readings) -> ParamTable:
    """Every trainable parameter's ``ParamStats`` (``NO_GRADIENT`` for those without a gradient),
    kept as the readings' rows and made on lookup.

    Args:
        layout: the trainable parameters, in the probe's order.
        readings: what the probe read this step.
    """
    return ParamTable(layout, readings.index, readings.rows, readings.nonfinite)


def module_stats(params: ParamTable) -> ModuleTable:
    """Aggregate each module's own parameters (not its children's): norms as sqrt of summed squares."""
    return ModuleTable(params)


def combine_norms(norms: list[float]) -> float:
    """L2 norm of the concatenation, from the parts' L2 norms (in float64)."""
    return math.sqrt(math.fsum(n * n for n in norms))


def total_norm(readings: Readings) -> float:
    """L2 norm over every gradient, as ``clip_grad_norm_`` computes it (0.0 when none arrived)."""
    return combine_norms([row[GRAD_NORM] for row in readings.rows])


def clip_coefficient(clip_norm: float, max_norm: float) -> float:
    """What ``clip_grad_norm_`` multiplied the gradients by (its formula, including the 1e-6)."""
    coef = max_norm / (clip_norm + 1e-6)
    return coef if math.isnan(coef) else min(1.0, coef)


def clip_norm(readings: Readings, norm_type: float) -> float:
    """The total norm ``clip_grad_norm_`` computes for ``norm_type``, from the per-gradient readings."""
    if math.isinf(norm_type):
        if readings.nonfinite:  # max |g| rows then hold finite maxima; the true max is NaN or Inf
            return math.nan if any(nans for nans, _ in readings.nonfinite.values()) else math.inf
        return max((row[GRAD_MAX_ABS] for row in readings.rows), default=0.0)
    if norm_type == 2.0:
        return combine_norms([row[GRAD_NORM] for row in readings.rows])
    norms = [row[EXTRA_NORM] for row in readings.rows]
    return math.fsum(n**norm_type for n in norms) ** (1.0 / norm_type)


def clean(step: StepRecord) -> bool:
    """A step the rules judge by: no backward error, not skipped, a finite loss (or none) and finite gradients."""
    bad = (step.loss is not None and not math.isfinite(step.loss)) or not math.isfinite(step.grad_norm_total)
    return step.backward_error is None and not step.skipped and not bad


def fully_dead(step: StepRecord) -> bool:
    """Some ReLU of the step was dead for every unit (the batch itself is degenerate)."""
    return any(a.kind == "relu" and a.fraction == 1.0 for a in step.activations.values())


def median(values: Iterable[float]) -> float:
    """The middle value; for an even count the mean of the middle two (``statistics.median``).

    Raises:
        statistics.StatisticsError: no values.
    """
    return statistics.median(values)
