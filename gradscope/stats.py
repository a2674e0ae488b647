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
    out = {info.name: NO_GRADIENT for info in infos}
    for i, row in zip(readings.index, readings.rows):
        info = infos[i]
        nan_count, inf_count, finite_max = readings.nonfinite.get(i, (0, 0, row[GRAD_MAX_ABS]))
        out[info.name] = ParamStats(
            grad_norm=row[GRAD_NORM],
            grad_max_abs=finite_max,
            zero_fraction=1.0 - row[GRAD_NONZERO] / info.numel if info.numel else 0.0,
            nan_count=int(nan_count),
            inf_count=int(inf_count),
            param_norm=row[PARAM_NORM],
            grad_to_param=_ratio(row[GRAD_NORM], row[PARAM_NORM]),
        )
    return out


def module_stats(infos: list[ParamInfo], params: dict[str, ParamStats]) -> dict[str, ModuleStats]:
    """Aggregate each module's own parameters (not its children's): norms as sqrt of summed squares."""
    owned: dict[str, list[ParamInfo]] = defaultdict(list)
    for info in infos:
        if info.name in params:
            owned[info.module].append(info)
    return {module: _aggregate(members, params) for module, members in owned.items()}


def _aggregate(members: list[ParamInfo], params: dict[str, ParamStats]) -> ModuleStats:
    got = [(info, params[info.name]) for info in members if params[info.name].received]
    grad_norm = combine_norms([s.grad_norm for _, s in got]) if got else None
    param_norm = combine_norms([s.param_norm for _, s in got]) if got else None
    numel = sum(info.numel for info, _ in got)
    zeros = sum(s.zero_fraction * info.numel for info, s in got)
    return ModuleStats(
        grad_norm=grad_norm,
        grad_max_abs=max((s.grad_max_abs for _, s in got), default=None),
        zero_fraction=zeros / numel if numel else (0.0 if got else None),
        nan_count=sum(s.nan_count for _, s in got),
        inf_count=sum(s.inf_count for _, s in got),
        param_norm=param_norm,
        grad_to_param=_ratio(grad_norm, param_norm),
        parameters=len(members),
        received=len(got),
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


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or not den:
        return None
    return num / den


def clip_norm(readings: Readings, norm_type: float) -> float:
    """The total norm ``clip_grad_norm_`` computes for ``norm_type``, from the per-gradient readings."""
    if norm_type == 2.0:
        norms = [row[GRAD_NORM] for row in readings.rows]
        return combine_norms(norms)
    column = GRAD_MAX_ABS if math.isinf(norm_type) else EXTRA_NORM
    norms = [row[column] for row in readings.rows]
    if any(math.isnan(n) for n in norms):
        return math.nan
    if math.isinf(norm_type):
        return max(norms, default=0.0)
    return math.fsum(n**norm_type for n in norms) ** (1.0 / norm_type)
