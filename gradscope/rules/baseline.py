"""Baseline drift: per-layer gradient norms compared with a saved report of the same config."""

from __future__ import annotations

import math
from typing import Any

from gradscope.report import Anomaly, Report
from gradscope.rules.common import in_forward_order


def baseline_drift(report: Report, baseline: Report, check: Any) -> list[Anomaly]:
    """Layers whose gradient norm moved by more than ``check.factor`` (either way) at the same step,
    and layers that appeared, disappeared, or stopped (or started) getting a gradient."""
    steps = {s.step: s for s in baseline.steps}
    order = [p.name for p in in_forward_order(report)]
    moved: dict[str, tuple[int, float, float]] = {}
    for step in report.steps:
        old = steps.get(step.step)
        if old is None:
            continue
        for name in order:
            now, then = step.parameters.get(name), old.parameters.get(name)
            if name in moved or now is None or then is None:
                continue
            ratio = _ratio(now.grad_norm, then.grad_norm)
            if ratio is not None and not (1 / check.factor <= ratio <= check.factor):
                moved[name] = (step.step, then.grad_norm or 0.0, now.grad_norm or 0.0)
    out = []
    if moved:
        out.append(_moved(moved, check.factor, baseline))
    changed = _changed_layers(report, baseline)
    if changed:
        out.append(changed)
    return out


def _ratio(now: float | None, then: float | None) -> float | None:
    """now / then; None when both are missing or not finite. A gradient that appeared or vanished is
    an infinite (or zero) ratio."""
    if now is None and then is None:
        return None
    if now is None or then is None:
        return 0.0 if now is None else math.inf
    if not (math.isfinite(now) and math.isfinite(then)):
        return None
    if then == 0:
        return 1.0 if now == 0 else math.inf
    return now / then


def _moved(moved: dict[str, tuple[int, float, float]], factor: float, baseline: Report) -> Anomaly:
    first = next(iter(moved))
    step, then, now = moved[first]
    listing = ", ".join(f"{n} {t:.3g} -> {w:.3g}" for n, (_, t, w) in list(moved.items())[:8])
    more = f" and {len(moved) - 8} more" if len(moved) > 8 else ""
    return Anomaly(
        kind="baseline_drift",
        severity="error",
        module=first.rpartition(".")[0],
        parameter=first,
        step=step,
        message=(
            f"gradient norms moved by more than {factor:g}x from the baseline ({baseline.run.config or 'saved report'}) "
            f"in {len(moved)} parameters, first {first} at step {step} ({then:.3g} -> {now:.3g}): {listing}{more}. "
            f"A change to init, architecture or data moved them; if it is intended, update the baseline "
            f"(--update-baseline)."
        ),
        evidence={name: {"step": s, "baseline": t, "now": w} for name, (s, t, w) in moved.items()},
    )


def _changed_layers(report: Report, baseline: Report) -> Anomaly | None:
    now = {p.name for p in report.parameters if p.trainable}
    then = {p.name for p in baseline.parameters if p.trainable}
    added, removed = sorted(now - then), sorted(then - now)
    if not added and not removed:
        return None
    return Anomaly(
        kind="baseline_drift",
        severity="error",
        parameter=(added or removed)[0],
        module=(added or removed)[0].rpartition(".")[0],
        message=(
            f"the trainable parameters differ from the baseline's: {len(added)} new ({', '.join(added[:5])}), "
            f"{len(removed)} gone ({', '.join(removed[:5])}). Update the baseline if the change is intended."
        ),
        evidence={"added": added, "removed": removed},
    )
