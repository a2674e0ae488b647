"""Pure reductions of probe readings into report statistics (host-side, plain floats)."""

from __future__ import annotations

import math
from collections import defaultdict

from gradscope.probes.gradients import EXTRA_NORM, GRAD_MAX_ABS, GRAD_NONZERO, GRAD_NORM, PARAM_NORM, Readings
from gradscope.report import ModuleStats, ParamInfo, ParamStats

NO_GRADIENT = ParamStats(None, None, None, 0, 0, None, None)


def parameter_stats(infos: list[ParamInfo], readings: Readings) -> dict[str, ParamStats]:
    """One ``ParamStats`` per trainable parameter; those without a gradient get ``NO_GRADIENT``.

    Args:
        infos: the trainable parameters, in the probe's order.
        readings: what the probe read this step.
    """
    out = dict.fromkeys((info.name for info in infos), NO_GRADIENT)
    nonfinite = readings.nonfinite
    for i, row in zip(readings.index, readings.rows):
        info = infos[i]
        norm, param_norm = row[GRAD_NORM], row[PARAM_NORM]
        nans, infs = nonfinite.get(i, (0, 0)) if nonfinite else (0, 0)
        zero_fraction = 1.0 - row[GRAD_NONZERO] / info.numel if info.numel else 0.0
        ratio = norm / param_norm if param_norm else None
        out[info.name] = ParamStats(norm, row[GRAD_MAX_ABS], zero_fraction, nans, infs, param_norm, ratio)
    return out


def module_stats(infos: list[ParamInfo], params: dict[str, ParamStats]) -> dict[str, ModuleStats]:
    """Aggregate each module's own parameters (not its children's): norms as sqrt of summed squares."""
    owned: dict[str, list[ParamInfo]] = defaultdict(list)
    for info in infos:
        owned[info.module].append(info)
    return {module: _aggregate(members, params) for module, members in owned.items()}


def _aggregate(members: list[ParamInfo], params: dict[str, ParamStats]) -> ModuleStats:
    grad_sq = param_sq = zeros = 0.0
    numel = received = nans = infs = 0
    max_abs: float | None = None
    for info in members:
        s = params[info.name]
        if s.grad_norm is None:
            continue
        received += 1
        grad_sq += s.grad_norm * s.grad_norm
        param_sq += s.param_norm * s.param_norm  # type: ignore[operator]
        zeros += s.zero_fraction * info.numel  # type: ignore[operator]
        numel += info.numel
        nans, infs = nans + s.nan_count, infs + s.inf_count
        max_abs = s.grad_max_abs if max_abs is None else max(max_abs, s.grad_max_abs)  # type: ignore[type-var]
    if not received:
        return ModuleStats(None, None, None, 0, 0, None, None, len(members), 0)
    grad_norm, param_norm = math.sqrt(grad_sq), math.sqrt(param_sq)
    return ModuleStats(
        grad_norm=grad_norm,
        grad_max_abs=max_abs,
        zero_fraction=zeros / numel if numel else 0.0,
        nan_count=nans,
        inf_count=infs,
        param_norm=param_norm,
        grad_to_param=grad_norm / param_norm if param_norm else None,
        parameters=len(members),
        with_grad=received,
    )


def combine_norms(norms: list[float]) -> float:
    """L2 norm of the concatenation, from the parts' L2 norms (in float64)."""
    return math.sqrt(math.fsum(n * n for n in norms))


def total_norm(params: dict[str, ParamStats]) -> float:
    """L2 norm over every gradient, as ``clip_grad_norm_`` computes it (0.0 when none arrived)."""
    return combine_norms([s.grad_norm for s in params.values() if s.grad_norm is not None])


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
