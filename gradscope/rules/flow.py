"""Gradient flow: vanishing, exploding, unused and zero gradients."""

from __future__ import annotations

from typing import Any

from gradscope.report import Anomaly, ParamInfo, Report, StepRecord
from gradscope.rules.common import by_module, clean_steps, fully_dead, in_forward_order, median, weights_in_order


def _relative(step: StepRecord, weights: list[ParamInfo]) -> list[tuple[str, float]]:
    out = []
    for p in weights:
        s = step.parameters.get(p.name)
        if s is not None and s.grad_norm and s.param_norm:
            out.append((p.name, s.grad_norm / s.param_norm))
    return out


def _ends(values: list[float]) -> tuple[float, float]:
    k = min(3, max(1, len(values) // 3))
    return median(values[:k]), median(values[-k:])


def vanishing_gradient(report: Report, check: Any) -> list[Anomaly]:
    """Relative gradients (|grad| / |weight|) near the input far below those near the loss."""
    weights = weights_in_order(report)
    for step in clean_steps(report):
        rel = _relative(step, weights)
        if len(rel) < 2:
            continue
        first, last = _ends([r for _, r in rel])
        if first / last < check.ratio:
            start = next(name for name, r in reversed(rel) if r < check.ratio * last)
            return [_vanishing(step, rel, first, last, start, check)]
        if max(r for _, r in rel) < check.negligible:
            return [_negligible(step, rel, check)]
    return []


def _vanishing(
    step: StepRecord, rel: list[tuple[str, float]], first: float, last: float, start: str, check: Any
) -> Anomaly:
    return Anomaly(
        kind="vanishing_gradient",
        severity="error",
        module=start.rpartition(".")[0],
        parameter=start,
        step=step.step,
        message=(
            f"gradients vanish toward the input: |grad|/|weight| is {first:.2e} at {rel[0][0]} but "
            f"{last:.2e} at {rel[-1][0]} ({last / first:.1e}x smaller); it falls below {check.ratio:g} of the "
            f"output side's at {start}. Early layers will barely learn. Usual fixes: activations that do not "
            f"saturate (ReLU/GELU instead of sigmoid/tanh), residual connections, normalisation (LayerNorm/"
            f"BatchNorm), and variance-preserving init (He/Xavier)."
        ),
        evidence={"relative_gradient": dict(rel), "first": first, "last": last, "threshold": check.ratio},
    )


def _negligible(step: StepRecord, rel: list[tuple[str, float]], check: Any) -> Anomaly:
    top = max(r for _, r in rel)
    return Anomaly(
        kind="vanishing_gradient",
        severity="warning",
        step=step.step,
        message=(
            f"gradients are negligible everywhere: the largest |grad|/|weight| is {top:.2e} (< {check.negligible:g}); "
            f"no layer will move. Check the loss scale (a loss multiplied by a tiny constant), saturated outputs, or init."
        ),
        evidence={"relative_gradient": dict(rel)},
    )


def exploding_gradient(report: Report, check: Any) -> list[Anomaly]:
    """Relative gradients that grow toward the input, or are huge next to their weights."""
    weights = weights_in_order(report)
    for step in clean_steps(report):
        rel = _relative(step, weights)
        if not rel:
            continue
        name, top = max(rel, key=lambda item: item[1])
        first, last = _ends([r for _, r in rel]) if len(rel) >= 2 else (top, top)
        if len(rel) >= 2 and first / last > check.ratio:
            message = (
                f"gradients grow toward the input: |grad|/|weight| is {first:.2e} at {rel[0][0]} but {last:.2e} "
                f"at {rel[-1][0]} ({first / last:.1e}x larger)."
            )
        elif top > check.relative:
            message = f"gradients are huge: |grad| is {top:.3g}x |weight| at {name} (threshold {check.relative:g}); one SGD step at lr 0.01 would change it by more than its own norm."
        else:
            continue
        fix = " Usual fixes: smaller init (He/Xavier scale), normalisation, residual scaling, gradient clipping, a lower learning rate."
        return [
            Anomaly(
                kind="exploding_gradient",
                severity="error",
                module=name.rpartition(".")[0],
                parameter=name,
                step=step.step,
                message=message + fix,
                evidence={"relative_gradient": dict(rel), "grad_norm_total": step.grad_norm_total},
            )
        ]
    return []


def unused_parameter(report: Report, check: Any) -> list[Anomaly]:
    """Trainable parameters that got no gradient in any step, grouped by module."""
    steps = [s for s in report.steps if s.backward_error is None]
    if not steps:
        return []
    never = [p for p in report.parameters if p.trainable and not any(s.parameters[p.name].received for s in steps)]
    called = set(report.called_modules or ())
    out = []
    for module, params in by_module(never).items():
        names = [p.name for p in params]
        if report.called_modules is not None and module not in called:
            cause = f"{module or '(model)'} never runs in forward: drop it, or freeze it (requires_grad_(False)) if it is meant to be unused"
        elif report.called_modules is not None:
            cause = f"{module or '(model)'} runs in forward but its output does not reach the loss: cut off by .detach(), torch.no_grad() or discarded"
        else:
            cause = "it is never used in forward, or its output is cut off from the loss"
        out.append(
            Anomaly(
                kind="unused_parameter",
                severity="warning",
                module=module or None,
                parameter=names[0],
                message=f"{', '.join(names)} require a gradient but got none in {len(steps)} step(s): {cause}.",
                evidence={
                    "parameters": names,
                    "module_called": module in called if report.called_modules is not None else None,
                },
            )
        )
    return out


def zero_gradient(report: Report, check: Any) -> list[Anomaly]:
    """Gradients that arrive but are exactly zero everywhere, in every step: one finding, placed where
    the flow of gradient stops (an all-zero weight, or else the zero-gradient module nearest the loss)."""
    steps = clean_steps(report)
    if not steps or any(fully_dead(s) for s in steps):
        return []  # a layer of dead ReLUs explains it; dead_relu reports that
    params = in_forward_order(report)
    zero = [p for p in params if p.trainable and _always_zero(p.name, steps)]
    if not zero:
        return []
    blank = [
        p
        for p in params
        if len(p.shape) >= 2 and steps[0].parameters.get(p.name) and steps[0].parameters[p.name].param_norm == 0
    ]
    if blank:
        place = blank[-1]
        cause = (
            f" These weights are all zeros: {', '.join(p.name for p in blank[:6])}. A zero weight passes no gradient "
            f"back and zero activations give the next layer none: initialise them randomly (zero init is only "
            f"safe for the last layer of a residual branch)."
        )
    else:
        place = zero[-1]
        cause = " The path from the loss is dead: a multiplication by 0, a constant output, or dead units after it."
    names = [p.name for p in zero]
    return [
        Anomaly(
            kind="zero_gradient",
            severity="warning",
            module=place.module or None,
            parameter=place.name,
            step=steps[0].step,
            message=(
                f"no gradient flows back past {place.module or '(model)'}: the gradients of {len(names)} parameters "
                f"({', '.join(names[:6])}{'...' if len(names) > 6 else ''}) are exactly zero in every step.{cause}"
            ),
            evidence={"parameters": names, "zero_weights": [p.name for p in blank]},
        )
    ]


def _always_zero(name: str, steps: list[StepRecord]) -> bool:
    for s in steps:
        stats = s.parameters.get(name)
        if stats is None or not stats.received or stats.grad_norm != 0:
            return False
        if s.underflow and s.underflow.get(name, 0.0) > 0:
            return False  # fp32 keeps it: gradient_underflow reports that
    return True


def stale_gradient(report: Report, check: Any) -> list[Anomaly]:
    """Gradients added onto the previous step's because nothing zeroed them (a forgotten ``zero_grad()``)."""
    step = next((s for s in report.steps if s.stale), None)
    if step is None:
        return []
    steps = [s.step for s in report.steps if s.stale]
    names = list(step.stale)
    return [
        Anomaly(
            kind="stale_gradient",
            severity="error",
            module=names[0].rpartition(".")[0] or None,
            parameter=names[0],
            step=step.step,
            message=(
                f"gradients accumulate across optimizer steps: at step {step.step} the backward added onto the previous "
                f"step's gradient of {len(names)} parameters ({', '.join(names[:4])}{'...' if len(names) > 4 else ''}), "
                f"which nothing had zeroed (in {len(steps)} step(s)). Call optimizer.zero_grad() before each backward "
                f"(or after each step); accumulating over micro-batches on purpose zeroes after the optimizer step."
            ),
            evidence={"steps": steps, "parameters": names},
        )
    ]
