"""Broken gradients: NaN/Inf origins, errors raised in backward, hand-written backwards that are wrong."""

from __future__ import annotations

import math
import re
from typing import Any

from gradscope.report import Anomaly, Report, StepRecord
from gradscope.rules.common import loss_is_bad, nonfinite_step

PHASE_KIND = {
    "forward": "nonfinite_forward",
    "parameter": "nonfinite_forward",
    "loss": "nonfinite_loss",
    "input": "nonfinite_loss",
    "backward": "nonfinite_gradient",
}


def nonfinite(report: Report, check: Any) -> list[Anomaly]:
    """The first NaN/Inf of the run, at the op or node that made it; later spread is summarised."""
    bad = [s for s in report.steps if nonfinite_step(s)]
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
    if o.rank is not None:
        evidence["rank"] = o.rank  # rank 0 too
    evidence["steps_affected"] = [s.step for s in bad]
    on_rank = f"On rank {o.rank} ({_clean_ranks(first)}): " if o.rank is not None else ""
    return [
        Anomaly(
            kind=PHASE_KIND[o.phase],
            severity="error",
            module=o.module,
            parameter=o.tensors[0] if o.phase == "parameter" and o.tensors else None,
            step=first.step,
            message=on_rank + _origin_message(o, value, first.loss) + _samples(o) + spread + " " + _fix(o, first.loss),
            evidence=evidence,
            rank=o.rank,
        )
    ]


def _clean_ranks(step: StepRecord) -> str:
    """Which ranks' own losses and gradients stayed finite, for the message."""
    clean = [r.rank for r in step.ranks if not r.bad]
    if not clean:
        return f"all {len(step.ranks)} ranks saw it"
    return f"rank{'s' if len(clean) > 1 else ''} {', '.join(map(str, clean))} stayed finite before the all-reduce"


def first_bad_rank(step: StepRecord) -> int | None:
    """The first rank whose own loss or gradients were not finite (distributed runs)."""
    return next((r.rank for r in step.ranks if r.bad), None)


def _finite(loss: float | None) -> bool:
    return loss is not None and math.isfinite(loss)


def _origin_message(o: Any, value: str, loss: float | None = None) -> str:
    count = f"{o.count} of {o.numel} values" if o.numel else f"{o.count} values"
    where = f" in {o.module}" if o.module else ""
    at = f" Source: {o.source}." if o.source else ""
    if o.phase == "input":
        return f"{value} is already in the batch ({', '.join(o.tensors)}: {o.count} values) before the model runs."
    if o.phase == "parameter":
        return f"{value} is already in parameter {', '.join(o.tensors[:3])} before the forward pass."
    if o.phase == "backward" or (o.phase == "loss" and o.node):
        node = f" (autograd node {o.node})" if o.node and o.node not in (o.op or "") else ""
        where = where or (" in the loss (outside every module)" if o.phase == "loss" else "")
        return (
            f"{value} first appears in the backward pass: the gradient of {o.op}{node}{where} "
            f"is {value} ({count}, {o.dtype}) although the gradient flowing into it holds no {value}.{at}"
        )
    if o.op is None and o.phase == "loss":
        # gradscope.watch replays only the model: an origin outside it has no op to name.
        if _finite(loss):
            return (
                f"{value} first appears in the loss's backward: the model's outputs are finite and its backward "
                f"makes no {value} from a finite gradient, the loss's value is finite ({loss:.4g}), but the "
                f"gradient it sends into the model holds {value}."
            )
        return (
            f"{value} first appears after the model: its outputs are finite and its backward makes no {value} from "
            f"a finite gradient, so the loss computed from them (between the model's forward and backward) made it, "
            f"in its value or in its gradient."
        )
    span = ""
    if o.input_min is not None:
        span = f" from finite inputs in [{o.input_min:.4g}, {o.input_max:.4g}]"
    phase = "the loss" if o.phase == "loss" else "the forward pass"
    return f"{value} first appears in {phase}: {o.op}{where} returned {value} ({count}, {o.dtype}){span}.{at}"


FEW_SAMPLES = 8  # listed in the message; evidence.samples has them all


def _samples(o: Any) -> str:
    rows = list(o.samples)
    if not rows:
        return ""
    if len(rows) > FEW_SAMPLES:
        return f" {len(rows)} samples of the batch hold it there (evidence.samples)."
    which = "sample" if len(rows) == 1 else "samples"
    return f" It is in batch {which} {', '.join(map(str, rows))} (their rows at that op)."


def _spread(first: StepRecord, bad: list[StepRecord], kind: str) -> str:
    grads = sum(1 for s in first.parameters.values() if s.nan_count or s.inf_count)
    parts = []
    if grads:
        parts.append(f"{grads} parameters' gradients")
    if loss_is_bad(first):
        parts.append("the loss")
    later = [s.step for s in bad if s.step != first.step]
    text = f" It reaches {' and '.join(parts)} at step {first.step}" if parts else ""
    if later:
        text += f"{',' if text else ' It'} and persists in {len(later)} later step(s)"
    return text + "." if text else ""


def _fix(o: Any, loss: float | None = None) -> str:
    op = (o.op or "").lower()
    if o.phase == "input":
        return "Fix the data (or filter non-finite samples) before it reaches the model."
    if o.phase == "parameter":
        return "Check the initialisation or the update that wrote it (learning rate, a NaN gradient earlier)."
    if o.phase == "loss" and o.op is None and _finite(loss):
        return (
            "An op of the loss code has an infinite derivative where it was evaluated: sqrt or pow(x, p<1) at 0, "
            "or the norm of a zero vector (a difference that is exactly 0). Add an epsilon inside it."
        )
    if o.phase == "loss" and o.op is None:  # gradscope.watch sees the model, not the loss code
        return (
            "Look in the loss code for log or sqrt of values <= 0, a division by 0, or exp overflowing; a NaN only in "
            "the gradient comes from the loss's backward (sqrt or pow at 0, the norm of a zero vector). "
            "`gradscope inspect` with the same loss names its op and line."
        )
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
    if o.phase == "backward" or o.node:
        return "A backward formula divides by or multiplies into 0/Inf: check the op's domain (or the custom backward)."
    return "Check this op's inputs."


def _unlocated(step: StepRecord, count: int) -> Anomaly:
    names = [n for n, s in step.parameters.items() if s.nan_count or s.inf_count]
    kind = "nonfinite_loss" if loss_is_bad(step) else "nonfinite_gradient"
    what = "the loss" if kind == "nonfinite_loss" else f"the gradients of {len(names)} parameters"
    rank = first_bad_rank(step)
    where = f" on rank {rank}" if rank is not None else ""
    return Anomaly(
        kind=kind,
        severity="error",
        step=step.step,
        parameter=names[0] if names else None,
        message=(
            f"{what} became non-finite{where} at step {step.step} (in {count} step(s)); "
            "the op that made it could not be pinned."
        ),
        evidence={"parameters": names[:20]},
        rank=rank,
    )


def backward_error(report: Report, check: Any) -> list[Anomaly]:
    """PyTorch raised during backward: the error and the forward line that created the failing node."""
    out = []
    for step in report.steps:
        failure = step.backward_error
        if failure is None:
            continue
        out.append(
            Anomaly(
                kind="backward_error",
                severity="error",
                module=failure.modified_in or failure.module,  # where the fix goes: the in-place op's module
                step=step.step,
                message=f"backward raised at step {step.step}: {failure.message.splitlines()[0]}{_failure_site(failure)}",
                evidence={k: v for k, v in vars(failure).items() if v is not None and k != "message"}
                | {"error": failure.message},
            )
        )
    return out


def _failure_site(failure: Any) -> str:
    """Where backward failed, and for an in-place change, what changed the saved tensor."""
    text = ""
    if failure.node:
        module = f" (made in {failure.module})" if failure.module else ""
        made = f", created at {failure.source}" if failure.source else ""
        text = f" The failing node is {failure.node}{module}{made}."
    if failure.modified_by:
        where = f"in {failure.modified_in}" if failure.modified_in else "outside every module (the loss)"
        at = f" at {failure.modified_at}" if failure.modified_at else ""
        text += (
            f" The tensor it saved was changed in place by {failure.modified_by} {where}{at}: use its out-of-place "
            f"form (x = x * 2 for x.mul_(2), out = out + residual for out += residual, inplace=False)."
        )
    elif "inplace" in failure.message:
        text += " An in-place op (x.add_(), x[...] = , relu(inplace=True)) changed a tensor backward needs: use its out-of-place form."
    return text


def wrong_gradient(report: Report, check: Any) -> list[Anomaly]:
    """Custom autograd.Functions whose backward disagrees with finite differences (``--gradcheck``)."""
    return [
        Anomaly(
            kind="wrong_gradient",
            severity="error",
            module=g.module,
            message=(
                f"the hand-written backward of {g.function} ({g.source}) disagrees with finite differences "
                f"(torch.autograd.gradcheck, float64, on the inputs it saw): {_short_floats(g.detail)} Fix its backward formula."
            ),
            evidence={"function": g.function, "source": g.source, "detail": g.detail},
        )
        for g in report.gradchecks
        if g.passed is False
    ]


def _short_floats(text: str | None) -> str:
    """gradcheck's mismatch text with its floats to 4 significant digits (``numerical:0.9177537358081188``
    reads as ``numerical 0.9178``)."""
    if not text:
        return ""
    text = re.sub(r"(\w):(?=-?\d)", r"\1 ", text)
    return re.sub(r"-?\d+\.\d{5,}(?:e[-+]?\d+)?", lambda m: f"{float(m.group()):.4g}", text)
