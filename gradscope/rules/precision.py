"""Clipping and precision: clipping that always fires, grad-scaler overflows, fp16/bf16 underflow."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gradscope.report import Anomaly, Report, StepRecord
from gradscope.rules.common import in_forward_order, median, nonfinite_step, totals


def gradient_clipping(report: Report, check: Any) -> list[Anomaly]:
    """Clipping fires in more than ``fraction`` of the steps."""
    # A step with no coefficient was not clipped (gradscope.watch records one only when clipping happened).
    steps = [s for s in report.steps if math.isfinite(s.grad_norm_total)]
    clipped = [s for s in steps if s.clip_coefficient is not None and s.clip_coefficient < 1.0]
    run = totals(report)
    if run is not None:  # only some steps kept in full: the running totals count every step
        count, finite, listed = run.clipped_steps, run.finite_steps, list(run.clipped)
    else:
        # Without a configured clip (gradscope.watch sees the user's), the pre-clip norm is the L2 total.
        listed = [
            (s.step, s.clip_norm if s.clip_norm is not None else s.grad_norm_total, s.clip_coefficient) for s in clipped
        ]
        count, finite = len(clipped), len(steps)
    if not count or count / finite <= check.fraction:
        return []
    share = _dominant(clipped[-1]) if clipped else []
    if run is not None and run.clip_coefficient_median is not None:
        coefficient = run.clip_coefficient_median
    else:
        coefficient = median([c for _, _, c in listed])  # type: ignore[misc]
    severity = "warning" if coefficient < check.coefficient else "info"
    top = ", ".join(f"{name} {frac:.0%}" for name, frac in share[:3])
    max_norm = (report.run.clip or {}).get("max_norm")
    pre = [p for _, p, _ in listed]
    coefs = [c for _, _, c in listed]
    return [
        Anomaly(
            kind="gradient_clipping",
            severity=severity,
            module=share[0][0].rpartition(".")[0] if share else None,
            parameter=share[0][0] if share else None,
            step=listed[0][0],
            message=(
                f"clipping fires in {count} of {finite} steps{f' (max_norm {max_norm})' if max_norm else ''}: "
                f"pre-clip norms {_first(pre, total=count)}, "
                f"coefficients {_first(coefs, total=count)}. Largest shares of the squared norm: {top}. "
                f"{_clip_meaning(coefficient, check.coefficient)}"
            ),
            evidence={
                "steps": [step for step, _, _ in listed],
                "pre_clip_norms": pre,
                "coefficients": coefs,
                "dominant": dict(share[:5]),
                "clipped_steps": count,
            },
        )
    ]


def _clip_meaning(coefficient: float, threshold: float) -> str:
    """What the median coefficient says: a strong cut hides the gradients' size, a mild one trims them."""
    if coefficient < threshold:
        return (
            f"The median coefficient {coefficient:.3g} (under {threshold:g}) means the gradients are about "
            f"{1 / coefficient:.3g}x max_norm: while clipping is on, max_norm, not the gradient, sets the update size "
            f"and hides how large the gradients are. Raise max_norm, lower the LR, or fix the layer that dominates."
        )
    return (
        f"The median coefficient {coefficient:.3g} trims the updates by {1 - coefficient:.0%}: the gradients are "
        f"about {1 / coefficient:.3g}x max_norm, so max_norm only caps the largest steps (as recipes that clip "
        f"mean it to); nothing to fix unless you meant clipping as a rare guard."
    )


def _first(values: list, shown: int = 5, total: int | None = None) -> str:
    """The first values, with how many more there are (``1.81, 1.79, ... (50 in all)``)."""
    text = ", ".join(f"{v:.3g}" for v in values[:shown])
    total = len(values) if total is None else total
    return text + (f", ... ({total} in all)" if total > shown else "")


def _dominant(step: StepRecord) -> list[tuple[str, float]]:
    total = sum(s.grad_norm**2 for s in step.parameters.values() if s.grad_norm)
    if not total:
        return []
    shares = [(n, s.grad_norm**2 / total) for n, s in step.parameters.items() if s.grad_norm]
    return sorted(shares, key=lambda item: -item[1])


COLLAPSED = 1.0  # a scale below 1: the gradients overflow fp16 even unscaled


def loss_scale_overflow(report: Report, check: Any) -> list[Anomaly]:
    """fp16: steps the grad scaler skipped because the scaled gradients overflowed.

    Skips while the scale falls from its initial value to its working value (the steps before the
    first applied one) are calibration, what the scaler is built to do: at most an ``info``. Only
    skipping after calibration (more than ``fraction`` of those steps, or the last step), or a
    scale that collapses below 1, is a warning; no step ever applied with a collapsed scale is an
    error. A skip that follows a NaN/Inf made in the step belongs to that finding.
    """
    steps = [s for s in report.steps if s.loss_scale is not None]
    skipped = [s for s in steps if s.skipped and not nonfinite_step(s)]
    if not skipped:
        return []
    applied = next((i for i, s in enumerate(steps) if not s.skipped), len(steps))
    calibrating = [s for s in steps[:applied] if s.skipped and s.loss_scale >= COLLAPSED]
    after = [s for s in skipped if s not in calibrating]
    if not after:
        return [_calibration(calibrating, len(steps))]
    collapsed = [s for s in after if s.loss_scale < COLLAPSED]
    later = steps[applied:]
    fraction = len(after) / max(len(later), 1)
    severity = "warning" if fraction > check.fraction or after[-1] is steps[-1] or collapsed else "info"
    if collapsed and applied == len(steps) and len(steps) > 1:
        severity = "error"  # no step was ever applied: the model does not train at all
    return [_persisting(after, calibrating, collapsed, steps, severity)]


def _calibration(calibrating: list[StepRecord], total: int) -> Anomaly:
    first, last = calibrating[0], calibrating[-1]
    return Anomaly(
        kind="loss_scale_overflow",
        severity="info",
        step=first.step,
        message=(
            f"the grad scaler calibrated: it skipped the first {len(calibrating)} of {total} steps {_fall(first, last)}. "
            f"That is what a scaler does at the start; only skips after it has applied steps would mean gradients "
            f"near fp16's limit."
        ),
        evidence={"calibration_steps": [s.step for s in calibrating], "scales": [s.loss_scale for s in calibrating]},
    )


def _fall(first: StepRecord, last: StepRecord) -> str:
    """How the scale moved over the calibration skips (one skip, or a scale that did not change, has no fall)."""
    if first.loss_scale == last.loss_scale:
        return f"at loss scale {first.loss_scale:g} (the scaler lowers it after each skip)"
    return f"while the loss scale fell from {first.loss_scale:g} to {last.loss_scale:g}"


def _persisting(
    after: list[StepRecord],
    calibrating: list[StepRecord],
    collapsed: list[StepRecord],
    steps: list[StepRecord],
    severity: str,
) -> Anomaly:
    first = after[0]
    bad = [n for n, s in first.parameters.items() if s.nan_count or s.inf_count]
    scales = ", ".join(f"step {s.step}: {s.loss_scale:g}" for s in after[:5]) + (", ..." if len(after) > 5 else "")
    why = (
        f"the scale collapsed to {collapsed[-1].loss_scale:g} (below 1: the gradients overflow fp16 even unscaled)"
        if collapsed
        else ("the last step was skipped" if after[-1] is steps[-1] else f"{len(after)} skips after calibration")
    )
    calibrated = f" after {len(calibrating)} calibration skips" if calibrating else ""
    listed = f"{', '.join(bad[:4])}{'...' if len(bad) > 4 else ''}"
    located = next((s for s in after if s.overflow is not None), None)
    evidence = {
        "steps": [s.step for s in after],
        "scales": [s.loss_scale for s in after],
        "calibration_steps": [s.step for s in calibrating],
        "parameters": bad,
    }
    if located is not None:
        evidence["overflow"] = {"step": located.step, **dataclasses.asdict(located.overflow)}
    module = bad[0].rpartition(".")[0] if bad else None
    return Anomaly(
        kind="loss_scale_overflow",
        severity=severity,
        parameter=bad[0] if bad else None,
        module=located.overflow.module if located is not None and located.overflow.module else module,
        step=first.step,
        message=(
            f"{'no step was applied, the model does not train: ' if severity == 'error' else ''}"
            f"the grad scaler keeps skipping steps{calibrated}: {len(after)} of {len(steps)} ({scales}); {why}. "
            f"Scaled fp16 gradients overflowed in {len(bad)} parameters ({listed})"
            f"{_where_overflowed(located)}. Use bf16, or fix the layer whose gradients are that large."
        ),
        evidence=evidence,
    )


def _where_overflowed(step: StepRecord | None) -> str:
    """Where the replayed backward of the scaled loss first made an Inf."""
    if step is None or step.overflow is None:
        return ""
    o = step.overflow
    at = f" in {o.module}" if o.module else ""
    source = f" ({o.source})" if o.source else ""
    return (
        f"; at step {step.step} (scale {step.loss_scale:g}) the scaled gradient first overflowed in backward at "
        f"{o.node or o.op}{at}, from the forward op {o.op}{source}: {o.count} of {o.numel} {o.dtype} values"
    )


def gradient_underflow(report: Report, check: Any) -> list[Anomaly]:
    """Low precision flushes gradient entries to zero that an fp32 step keeps (below its range, not
    the rounding of a sum that cancels: see ``replay.underflow``)."""
    step = next((s for s in report.steps if s.underflow), None)
    if step is None or step.underflow is None or nonfinite_step(step):
        return []  # a step with a NaN/Inf: its zeros are that fault's, reported with its origin
    order = {p.name: i for i, p in enumerate(in_forward_order(report))}
    lost = sorted(
        ((n, f) for n, f in step.underflow.items() if f > check.fraction), key=lambda item: order.get(item[0], 0)
    )
    if not lost:
        return []
    worst = lost[-1][0]  # where it starts: the affected parameter nearest the loss
    listing = ", ".join(f"{n} {f:.0%}" for n, f in lost[-6:])
    precision = report.run.precision
    scaled = f" at loss scale {step.loss_scale:g}" if step.loss_scale is not None else ""
    return [
        Anomaly(
            kind="gradient_underflow",
            severity="warning",
            module=worst.rpartition(".")[0],
            parameter=worst,
            step=step.step,
            message=(
                f"{precision} flushes gradients to zero that fp32 keeps, on the same weights and batch: "
                f"{len(lost)} parameters lose more than {check.fraction:.0%} of their entries ({listing}), "
                f"whose fp32 values are below {precision}'s smallest normal{scaled}. {_underflow_advice(precision, step)}"
            ),
            evidence={"lost_fraction": dict(lost), "loss_scale": step.loss_scale},
        )
    ]


def _underflow_advice(precision: str, step: StepRecord) -> str:
    """What would keep these gradients, for the run's own precision and scaler."""
    if precision == "bf16":  # fp32's exponent range: the gradients themselves are below 1e-38
        return (
            "bf16 has fp32's range, where fp32 too holds them only as subnormals: multiply the loss by a "
            "constant (a fixed loss scale), or find why these gradients are this small."
        )
    if step.loss_scale is None:
        return "Turn the grad scaler on (drop scaler: false), use bf16 (fp32's range), or keep these layers in fp32."
    return (
        f"Start the grad scaler higher than {step.loss_scale:g} (GradScaler's init_scale), use bf16 (fp32's range), "
        "or keep these layers in fp32."
    )
