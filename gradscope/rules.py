"""Anomaly rules: pure functions from a report's statistics to findings.

Each rule takes the report (no anomalies yet) and its thresholds from the
config's ``checks:`` and returns what it finds; ``RULES`` lists them.
``diagnose`` applies severity overrides and ``ignore`` entries.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from gradscope.config import Checks
from gradscope.report import Anomaly, ParamInfo, Report, StepRecord

Rule = Callable[[Report, Any], list[Anomaly]]
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
EMBEDDINGS = ("Embedding", "EmbeddingBag")


def diagnose(report: Report, checks: Checks | None = None) -> tuple[tuple[Anomaly, ...], tuple[Anomaly, ...]]:
    """Every rule's findings, most severe first, and those the config's ``ignore`` accepts.

    Returns:
        ``(anomalies, ignored)``.
    """
    checks = checks or Checks()
    found: list[Anomaly] = []
    for kind, rule in RULES:
        for anomaly in rule(report, checks.rule(kind)):
            severity = checks.rule(anomaly.kind).severity
            if severity != "off":
                found.append(replace(anomaly, severity=severity) if severity else anomaly)
    kept = [a for a in found if not _ignored(a, checks)]
    ignored = [a for a in found if _ignored(a, checks)]
    return tuple(sorted(kept, key=_rank)), tuple(ignored)


def _rank(a: Anomaly) -> tuple[int, int]:
    return SEVERITY_ORDER[a.severity], a.step if a.step is not None else -1


def _ignored(anomaly: Anomaly, checks: Checks) -> bool:
    return any(
        entry.kind == anomaly.kind
        and fnmatch.fnmatchcase(anomaly.module or "", entry.module)
        and fnmatch.fnmatchcase(anomaly.parameter or "", entry.parameter)
        for entry in checks.ignore
    )


# --- NaN / Inf --------------------------------------------------------------------------------

PHASE_KIND = {
    "forward": "nonfinite_forward",
    "parameter": "nonfinite_forward",
    "loss": "nonfinite_loss",
    "input": "nonfinite_loss",
    "backward": "nonfinite_gradient",
}


def nonfinite(report: Report, check: Any) -> list[Anomaly]:
    """The first NaN/Inf of the run, at the op or node that made it; later spread is summarised."""
    bad = [s for s in report.steps if _nonfinite_step(s)]
    if not bad:
        return []
    first = next((s for s in bad if s.origin is not None), None)
    if first is None:
        return [_unlocated(bad[0], len(bad))]
    o = first.origin
    assert o is not None
    value = "NaN" if o.kind == "nan" else "Inf"
    spread = _spread(first, bad, o.kind)
    evidence = {k: v for k, v in vars(o).items() if v not in (None, (), 0)}
    evidence["steps_affected"] = [s.step for s in bad]
    return [
        Anomaly(
            kind=PHASE_KIND[o.phase],
            severity="error",
            module=o.module,
            parameter=o.tensors[0] if o.phase == "parameter" and o.tensors else None,
            step=first.step,
            message=_origin_message(o, value) + spread + " " + _fix(o),
            evidence=evidence,
        )
    ]


def _nonfinite_step(step: StepRecord) -> bool:
    if step.backward_error is not None:
        return False
    grads_bad = any(s.nan_count or s.inf_count for s in step.parameters.values())
    if step.skipped and step.origin is None:
        return False  # a grad-scaler overflow: loss_scale_overflow reports it
    return not math.isfinite(step.loss) or grads_bad


def _origin_message(o: Any, value: str) -> str:
    count = f"{o.count} of {o.numel} values" if o.numel else f"{o.count} values"
    where = f" in {o.module}" if o.module else ""
    at = f" Source: {o.source}." if o.source else ""
    if o.phase == "input":
        return f"{value} is already in the batch ({', '.join(o.tensors)}: {o.count} values) before the model runs."
    if o.phase == "parameter":
        return f"{value} is already in parameter {', '.join(o.tensors[:3])} before the forward pass."
    if o.phase == "backward":
        node = f" (autograd node {o.node})" if o.node and o.node not in (o.op or "") else ""
        return (
            f"{value} first appears in the backward pass: the gradient of {o.op}{node}{where} "
            f"is {value} ({count}, {o.dtype}) although the gradient flowing into it is finite.{at}"
        )
    span = ""
    if o.input_min is not None:
        span = f" from finite inputs in [{o.input_min:.4g}, {o.input_max:.4g}]"
    phase = "the loss" if o.phase == "loss" else "the forward pass"
    return f"{value} first appears in {phase}: {o.op}{where} returned {value} ({count}, {o.dtype}){span}.{at}"


def _spread(first: StepRecord, bad: list[StepRecord], kind: str) -> str:
    grads = sum(1 for s in first.parameters.values() if s.nan_count or s.inf_count)
    parts = []
    if grads:
        parts.append(f"{grads} parameters' gradients")
    if not math.isfinite(first.loss):
        parts.append("the loss")
    later = [s.step for s in bad if s.step != first.step]
    text = f" It reaches {' and '.join(parts)} at step {first.step}" if parts else ""
    if later:
        text += f"{',' if text else ' It'} and persists in {len(later)} later step(s)"
    return text + "." if text else ""


def _fix(o: Any) -> str:
    op = (o.op or "").lower()
    if o.phase == "input":
        return "Fix the data (or filter non-finite samples) before it reaches the model."
    if o.phase == "parameter":
        return "Check the initialisation or the update that wrote it (learning rate, a NaN gradient earlier)."
    if o.dtype == "float16" and o.kind == "inf":
        return "float16 overflows above 65504: run in bf16, or keep this op in fp32 (autocast(enabled=False))."
    if any(k in op for k in ("log", "sqrt", "pow", "rsqrt")):
        return "Its input leaves the function's domain (log/sqrt of <= 0): clamp it or add an epsilon."
    if any(k in op for k in ("div", "reciprocal")):
        return "A division by zero: add an epsilon to the denominator."
    if "softmax" in op:
        return "A softmax over a row that is all -inf (fully masked): keep at least one position unmasked."
    if "exp" in op:
        return "exp overflows: subtract the maximum first (logsumexp) or clamp its input."
    if o.phase == "backward":
        return "A backward formula divides by or multiplies into 0/Inf: check the op's domain (or the custom backward)."
    return "Check this op's inputs."


def _unlocated(step: StepRecord, count: int) -> Anomaly:
    names = [n for n, s in step.parameters.items() if s.nan_count or s.inf_count]
    kind = "nonfinite_loss" if not math.isfinite(step.loss) else "nonfinite_gradient"
    what = "the loss" if kind == "nonfinite_loss" else f"the gradients of {len(names)} parameters"
    return Anomaly(
        kind=kind,
        severity="error",
        step=step.step,
        parameter=names[0] if names else None,
        message=f"{what} became non-finite at step {step.step} (in {count} step(s)); the op that made it could not be pinned.",
        evidence={"parameters": names[:20]},
    )


def backward_error(report: Report, check: Any) -> list[Anomaly]:
    """PyTorch raised during backward: the error and the forward line that created the failing node."""
    out = []
    for step in report.steps:
        failure = step.backward_error
        if failure is None:
            continue
        where = f" The failing node {failure.node} was created at {failure.source}." if failure.source else ""
        hint = " An in-place op (x.add_(), x[...] = , relu(inplace=True)) changed a tensor backward needs: use its out-of-place form." if "inplace" in failure.message else ""
        out.append(
            Anomaly(
                kind="backward_error",
                severity="error",
                step=step.step,
                message=f"backward raised at step {step.step}: {failure.message.splitlines()[0]}{where}{hint}",
                evidence={"node": failure.node, "source": failure.source, "error": failure.message},
            )
        )
    return out


# --- gradient flow ------------------------------------------------------------------------------


def _clean_steps(report: Report) -> list[StepRecord]:
    return [s for s in report.steps if s.backward_error is None and not _nonfinite_step(s) and not s.skipped]


def _weights(report: Report) -> list[ParamInfo]:
    """Weight matrices and kernels (not biases, norms or embeddings), from input to output."""
    weights = [
        p for p in report.parameters if p.trainable and len(p.shape) >= 2 and p.module_type not in EMBEDDINGS
    ]
    order = {name: i for i, name in enumerate(report.called_modules or ())}
    if order:
        weights = [p for p in weights if p.module in order]
        weights.sort(key=lambda p: order[p.module])
    return weights


def _relative(step: StepRecord, weights: list[ParamInfo]) -> list[tuple[str, float]]:
    out = []
    for p in weights:
        s = step.parameters.get(p.name)
        if s is not None and s.grad_norm and s.param_norm:
            out.append((p.name, s.grad_norm / s.param_norm))
    return out


def _ends(values: list[float]) -> tuple[float, float]:
    k = min(3, max(1, len(values) // 3))
    return _median(values[:k]), _median(values[-k:])


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else math.sqrt(ordered[mid - 1] * ordered[mid])


def vanishing_gradient(report: Report, check: Any) -> list[Anomaly]:
    """Relative gradients (|grad| / |weight|) near the input far below those near the loss."""
    weights = _weights(report)
    for step in _clean_steps(report):
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


def _vanishing(step: StepRecord, rel: list[tuple[str, float]], first: float, last: float, start: str, check: Any) -> Anomaly:
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
    weights = _weights(report)
    for step in _clean_steps(report):
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


# --- activations ----------------------------------------------------------------------------------


def dead_relu(report: Report, check: Any) -> list[Anomaly]:
    """ReLU units that output zero for every sample of the batch."""
    return _activation_rule(report, check, ("relu",), "dead_relu", _dead_message)


def saturated_activation(report: Report, check: Any) -> list[Anomaly]:
    """Sigmoid/tanh units pinned at their bounds for every sample."""
    return _activation_rule(report, check, ("sigmoid", "tanh"), "saturated_activation", _saturated_message)


def _activation_rule(report: Report, check: Any, kinds: tuple[str, ...], kind: str, message: Callable[..., str]) -> list[Anomaly]:
    seen: dict[str, Anomaly] = {}
    for step in _clean_steps(report):
        for site, a in step.activations.items():
            if a.kind not in kinds or site in seen or a.samples < check.min_samples or a.fraction < check.fraction:
                continue
            seen[site] = Anomaly(
                kind=kind,
                severity="warning",
                module=a.module,
                step=step.step,
                message=message(a),
                evidence={"fraction": a.fraction, "units": a.units, "samples": a.samples, "source": a.source, "site": site},
            )
    return list(seen.values())


def _dead_message(a: Any) -> str:
    at = f" ({a.source})" if a.source else ""
    blocked = " No gradient flows back through this layer." if a.fraction == 1.0 else ""
    return (
        f"{a.fraction:.0%} of the {a.units} units of the ReLU in {a.module}{at} are dead: zero for all "
        f"{a.samples} samples, so they pass no gradient.{blocked} Usual causes: a learning rate too high, negative "
        f"biases, poor init. Fixes: lower LR, He init, LeakyReLU/GELU, normalisation before the ReLU."
    )


def _saturated_message(a: Any) -> str:
    at = f" ({a.source})" if a.source else ""
    bound = "0 or 1" if a.kind == "sigmoid" else "-1 or 1"
    return (
        f"{a.fraction:.0%} of the outputs of the {a.kind} in {a.module}{at} ({a.units} units x {a.samples} samples) "
        f"are within 0.01 of {bound}, where its derivative is near 0 and the gradient stops. Fixes: smaller init "
        f"(Xavier), normalisation before it, or a non-saturating activation."
    )


# --- parameters -----------------------------------------------------------------------------------


def unused_parameter(report: Report, check: Any) -> list[Anomaly]:
    """Trainable parameters that got no gradient in any step, grouped by module."""
    steps = [s for s in report.steps if s.backward_error is None]
    if not steps:
        return []
    never = [p for p in report.parameters if p.trainable and not any(s.parameters[p.name].received for s in steps)]
    called = set(report.called_modules or ())
    out = []
    for module, params in _by_module(never).items():
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
                evidence={"parameters": names, "module_called": module in called if report.called_modules is not None else None},
            )
        )
    return out


def zero_gradient(report: Report, check: Any) -> list[Anomaly]:
    """Gradients that arrive but are exactly zero everywhere, in every step: one finding, placed where
    the flow of gradient stops (an all-zero weight, or else the zero-gradient module nearest the loss)."""
    steps = _clean_steps(report)
    if not steps or any(_fully_dead(s) for s in steps):
        return []  # a layer of dead ReLUs explains it; dead_relu reports that
    params = _in_forward_order(report)
    zero = [p for p in params if p.trainable and _always_zero(p.name, steps)]
    if not zero:
        return []
    blank = [p for p in params if len(p.shape) >= 2 and steps[0].parameters.get(p.name) and steps[0].parameters[p.name].param_norm == 0]
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


def _fully_dead(step: StepRecord) -> bool:
    return any(a.kind == "relu" and a.fraction == 1.0 for a in step.activations.values())


def _in_forward_order(report: Report) -> list[ParamInfo]:
    order = {name: i for i, name in enumerate(report.called_modules or ())}
    if not order:
        return list(report.parameters)
    return sorted(report.parameters, key=lambda p: order.get(p.module, len(order)))


def _by_module(params: list[ParamInfo]) -> dict[str, list[ParamInfo]]:
    groups: dict[str, list[ParamInfo]] = {}
    for p in params:
        groups.setdefault(p.module, []).append(p)
    return groups


# --- clipping and precision -------------------------------------------------------------------------


def gradient_clipping(report: Report, check: Any) -> list[Anomaly]:
    """Clipping fires in more than ``fraction`` of the steps."""
    steps = [s for s in report.steps if s.clip_coefficient is not None and math.isfinite(s.grad_norm_total)]
    clipped = [s for s in steps if s.clip_coefficient < 1.0]
    if not clipped or len(clipped) / len(steps) <= check.fraction:
        return []
    share = _dominant(clipped[-1])
    coefficient = _median([s.clip_coefficient for s in clipped])  # type: ignore[misc]
    severity = "warning" if coefficient < check.coefficient else "info"
    top = ", ".join(f"{name} {frac:.0%}" for name, frac in share[:3])
    max_norm = (report.run.clip or {}).get("max_norm")
    norms = ", ".join(f"{s.clip_norm:.3g}" for s in clipped[:5])
    coefs = ", ".join(f"{s.clip_coefficient:.3g}" for s in clipped[:5])
    return [
        Anomaly(
            kind="gradient_clipping",
            severity=severity,
            module=share[0][0].rpartition(".")[0] if share else None,
            parameter=share[0][0] if share else None,
            step=clipped[0].step,
            message=(
                f"clipping fires in {len(clipped)} of {len(steps)} steps (max_norm {max_norm}): pre-clip norms {norms}, "
                f"coefficients {coefs}. Largest shares of the squared norm: {top}. While clipping is on, max_norm, not "
                f"the gradient, sets the update size; by a factor under {check.coefficient:g} it hides how large the "
                f"gradients are: raise max_norm, lower the LR, or fix the layer that dominates."
            ),
            evidence={
                "steps": [s.step for s in clipped],
                "pre_clip_norms": [s.clip_norm for s in clipped],
                "coefficients": [s.clip_coefficient for s in clipped],
                "dominant": dict(share[:5]),
            },
        )
    ]


def _dominant(step: StepRecord) -> list[tuple[str, float]]:
    total = sum(s.grad_norm**2 for s in step.parameters.values() if s.grad_norm)
    if not total:
        return []
    shares = [(n, s.grad_norm**2 / total) for n, s in step.parameters.items() if s.grad_norm]
    return sorted(shares, key=lambda item: -item[1])


def loss_scale_overflow(report: Report, check: Any) -> list[Anomaly]:
    """fp16: steps the grad scaler skipped because the scaled gradients overflowed."""
    skipped = [s for s in report.steps if s.skipped and s.origin is None]
    if not skipped:
        return []
    fraction = len(skipped) / len(report.steps)
    first = skipped[0]
    bad = [n for n, s in first.parameters.items() if s.nan_count or s.inf_count]
    severity = "warning" if fraction > check.fraction or skipped[-1] is report.steps[-1] else "info"
    scales = ", ".join(f"step {s.step}: {s.loss_scale:g}" for s in skipped[:5])
    return [
        Anomaly(
            kind="loss_scale_overflow",
            severity=severity,
            parameter=bad[0] if bad else None,
            module=bad[0].rpartition(".")[0] if bad else None,
            step=first.step,
            message=(
                f"the grad scaler skipped {len(skipped)} of {len(report.steps)} steps ({scales}): scaled fp16 gradients "
                f"overflowed in {len(bad)} parameters ({', '.join(bad[:4])}{'...' if len(bad) > 4 else ''}). A few skips "
                f"while the scale calibrates are normal; many mean gradients near fp16's limit: use bf16, or find the "
                f"layer whose gradients are that large."
            ),
            evidence={"steps": [s.step for s in skipped], "scales": [s.loss_scale for s in skipped], "parameters": bad},
        )
    ]


def gradient_underflow(report: Report, check: Any) -> list[Anomaly]:
    """Low precision flushes gradient entries to zero that an fp32 step keeps."""
    step = next((s for s in report.steps if s.underflow), None)
    if step is None or step.underflow is None:
        return []
    order = {p.name: i for i, p in enumerate(_in_forward_order(report))}
    lost = sorted(((n, f) for n, f in step.underflow.items() if f > check.fraction), key=lambda item: order.get(item[0], 0))
    if not lost:
        return []
    worst = lost[-1][0]  # where it starts: the affected parameter nearest the loss
    listing = ", ".join(f"{n} {f:.0%}" for n, f in lost[-6:])
    return [
        Anomaly(
            kind="gradient_underflow",
            severity="warning",
            module=worst.rpartition(".")[0],
            parameter=worst,
            step=step.step,
            message=(
                f"{report.run.precision} flushes gradients to zero that fp32 keeps, on the same weights and batch: "
                f"{len(lost)} parameters lose more than {check.fraction:.0%} of their entries ({listing}). "
                f"Use bf16 (fp32's range), a larger loss scale, or keep these layers in fp32."
            ),
            evidence={"lost_fraction": dict(lost)},
        )
    ]


def wrong_gradient(report: Report, check: Any) -> list[Anomaly]:
    """Custom autograd.Functions whose backward disagrees with finite differences (``--gradcheck``)."""
    return [
        Anomaly(
            kind="wrong_gradient",
            severity="error",
            module=g.module,
            message=(
                f"the hand-written backward of {g.function} ({g.source}) disagrees with finite differences "
                f"(torch.autograd.gradcheck, float64, on the inputs it saw): {g.detail} Fix its backward formula."
            ),
            evidence={"function": g.function, "source": g.source, "detail": g.detail},
        )
        for g in report.gradchecks
        if g.passed is False
    ]


RULES: tuple[tuple[str, Rule], ...] = (
    ("nonfinite_forward", nonfinite),
    ("backward_error", backward_error),
    ("vanishing_gradient", vanishing_gradient),
    ("exploding_gradient", exploding_gradient),
    ("dead_relu", dead_relu),
    ("saturated_activation", saturated_activation),
    ("unused_parameter", unused_parameter),
    ("zero_gradient", zero_gradient),
    ("gradient_clipping", gradient_clipping),
    ("loss_scale_overflow", loss_scale_overflow),
    ("gradient_underflow", gradient_underflow),
    ("wrong_gradient", wrong_gradient),
)
