"""Gradient flow: vanishing and exploding gradients along the model's depth, and stale gradients.

Depth is compared block by block (``rules.depth``), and what zero-initialised
partners explain is left out, so LoRA's ``A``, the query and key weights of an
attention block at init, or a ReZero branch are not read as a network whose
early layers starve.
"""

from __future__ import annotations

from typing import Any

from gradscope.report import Anomaly, ParamInfo, Report, StepRecord, tables
from gradscope.rules.common import clean_steps, median, per_report, weights_in_order
from gradscope.rules.depth import Partner, by_block, explained, zero_partners

# Optimizers whose update does not scale with the gradient (per-element normalised steps):
# a constant factor on the loss, or a huge |grad|/|weight|, changes nothing they do.
SCALE_FREE = ("adam", "adagrad", "adadelta", "rmsprop", "adafactor", "lion", "lamb", "sophia", "came")
REFERENCE_LR = 0.01  # what ``exploding_gradient.relative`` assumes when the learning rate is not known

Blocks = list[tuple[str, float, list[str]]]


def _relative(step: StepRecord, weights: list[ParamInfo]) -> list[tuple[str, float]]:
    return tables.grad_to_param(step.parameters, [p.name for p in weights])


def _ends(values: list[float]) -> tuple[float, float]:
    k = min(3, max(1, len(values) // 3))
    return median(values[:k]), median(values[-k:])


@per_report
def _judged(report: Report) -> tuple[list[ParamInfo], dict[str, str], list[Partner]]:
    """The weights the flow rules compare (not those zero-initialised partners explain), their
    modules, and the partners."""
    partners = zero_partners(report)
    skip = explained(partners)
    weights = [p for p in weights_in_order(report) if p.name not in skip]
    return weights, {p.name: p.module for p in weights}, partners


def vanishing_gradient(report: Report, check: Any) -> list[Anomaly]:
    """The blocks nearest the input, as a whole, get relative gradients far below those nearest the loss."""
    weights, modules, partners = _judged(report)
    found: list[Anomaly] = []
    for step in clean_steps(report):
        rel = _relative(step, weights)
        blocks = by_block(rel, modules)
        if len(blocks) >= 2:
            first, last = _ends([m for _, m, _ in blocks])
            if first / last < check.ratio:
                found = [_vanishing(step, rel, blocks, first, last, check)]
                break
        if len(rel) >= 2 and max(r for _, r in rel) < check.negligible:
            found = [_negligible(step, rel, check)]
            break
    note = _partner_note(report, partners, check)
    return found + ([note] if note and not found else [])


def _vanishing(
    step: StepRecord, rel: list[tuple[str, float]], blocks: Blocks, first: float, last: float, check: Any
) -> Anomaly:
    block, _, members = next(b for b in reversed(blocks) if b[1] < check.ratio * last)
    ratios = dict(rel)
    start = next((n for n in members if ratios[n] < check.ratio * last), members[0])
    return Anomaly(
        kind="vanishing_gradient",
        severity="error",
        module=start.rpartition(".")[0],
        parameter=start,
        step=step.step,
        message=(
            f"gradients vanish toward the input: the median |grad|/|weight| of a block's weights is {first:.2e} "
            f"at {blocks[0][0]} but {last:.2e} at {blocks[-1][0]} ({last / first:.1e}x smaller; blocks compared "
            f"as a whole, like with like); it falls below {check.ratio:g} of the output side's at {block} "
            f"({start}). Early layers will barely learn. Usual fixes: activations that do not saturate "
            f"(ReLU/GELU instead of sigmoid/tanh), residual connections, normalisation (LayerNorm/BatchNorm), "
            f"and variance-preserving init (He/Xavier)."
        ),
        evidence={
            "relative_gradient": ratios,
            "blocks": {b: m for b, m, _ in blocks},
            "first": first,
            "last": last,
            "threshold": check.ratio,
        },
    )


def _negligible(step: StepRecord, rel: list[tuple[str, float]], check: Any) -> Anomaly:
    top = max(r for _, r in rel)
    return Anomaly(
        kind="vanishing_gradient",
        severity="warning",
        step=step.step,
        message=(
            f"gradients are negligible everywhere: the largest |grad|/|weight| is {top:.2e} (< {check.negligible:g}); "
            f"no layer will move. Check the loss scale (a loss multiplied by a tiny constant), saturated outputs, "
            f"normalisation gains initialised near zero, or init."
        ),
        evidence={"relative_gradient": dict(rel)},
    )


def _partner_note(report: Report, partners: list[Partner], check: Any) -> Anomaly | None:
    """An info naming the zero-initialised weights, when the weights they gate got zero or tiny gradients."""
    gated = [n for p in partners for n in p.gated]
    if not gated:
        return None
    medians: dict[int, float | None] = {}
    held = [n for n in gated if _held_back(report, n, check.ratio, medians)]
    if not held:
        return None
    zeros = [p.name for p in partners]
    return Anomaly(
        kind="vanishing_gradient",
        severity="info",
        module=partners[0].scope or None,
        parameter=zeros[0],
        message=(
            f"{len(zeros)} parameter(s) start at zero but get a gradient of their own ({', '.join(zeros[:3])}"
            f"{'...' if len(zeros) > 3 else ''}): until the first optimizer steps move them, the {len(held)} "
            f"weight(s) of their branches ({', '.join(held[:3])}{'...' if len(held) > 3 else ''}) get zero or tiny "
            f"gradients by design (LoRA's B, ReZero gates, zero-initialised residual branches, adaLN-Zero). "
            f"They are left out of the vanishing and exploding checks."
        ),
        evidence={"zero_initialised": zeros, "held_back": held, "branches": {p.name: p.scope for p in partners}},
    )


def _held_back(report: Report, name: str, ratio: float, medians: dict[int, float | None]) -> bool:
    for step in clean_steps(report):
        s = step.parameters.get(name)
        if s is None or s.grad_norm is None:
            continue
        if s.grad_norm == 0:
            return True
        if step.step not in medians:  # once per step, not once per parameter
            ratios = [t.grad_to_param for t in step.parameters.values() if t.grad_to_param]
            medians[step.step] = median(ratios) if ratios else None
        typical = medians[step.step]
        if s.grad_to_param is not None and typical is not None and s.grad_to_param < ratio * typical:
            return True
    return False


def exploding_gradient(report: Report, check: Any) -> list[Anomaly]:
    """Relative gradients that grow toward the input (block by block), or updates the optimizer in use
    would make larger than the weights themselves."""
    weights, modules, _ = _judged(report)
    optimizer = (report.run.optimizer or "").lower()
    scale_free = any(name in optimizer for name in SCALE_FREE)
    lr = report.run.lr if report.run.lr is not None and not scale_free else None
    for step in clean_steps(report):
        rel = _relative(step, weights)
        if not rel:
            continue
        name, top = max(rel, key=lambda item: item[1])
        blocks = by_block(rel, modules)
        first, last = _ends([m for _, m, _ in blocks]) if len(blocks) >= 2 else (top, top)
        if len(blocks) >= 2 and first / last > check.ratio:
            message = (
                f"gradients grow toward the input: the median |grad|/|weight| of a block's weights is {first:.2e} "
                f"at {blocks[0][0]} but {last:.2e} at {blocks[-1][0]} ({first / last:.1e}x larger)."
            )
        elif not scale_free and top * (lr or REFERENCE_LR) / REFERENCE_LR > check.relative:
            message = _huge_message(name, top, lr, optimizer, check)
        else:
            continue
        fix = " Usual fixes: smaller init (He/Xavier scale), normalisation, residual scaling, gradient clipping, a lower learning rate."
        evidence = {
            "relative_gradient": dict(rel),
            "grad_norm_total": step.grad_norm_total,
            "optimizer": optimizer or None,
        }
        if lr is not None:
            evidence["lr"] = lr
        return [
            Anomaly(
                kind="exploding_gradient",
                severity="error",
                module=name.rpartition(".")[0],
                parameter=name,
                step=step.step,
                message=message + fix,
                evidence=evidence,
            )
        ]
    return []


def _huge_message(name: str, top: float, lr: float | None, optimizer: str, check: Any) -> str:
    if lr is not None:
        return (
            f"gradients are huge for {optimizer or 'the optimizer'} at lr {lr:g}: |grad| is {top:.3g}x |weight| at "
            f"{name}, so one step changes it by about {lr * top:.3g}x its own norm (threshold "
            f"{check.relative * REFERENCE_LR:g}, from exploding_gradient.relative at lr {REFERENCE_LR:g}); "
            f"momentum makes it larger."
        )
    return (
        f"gradients are huge: |grad| is {top:.3g}x |weight| at {name} (threshold {check.relative:g}); with no "
        f"optimizer known this assumes SGD at lr {REFERENCE_LR:g}, where one step would change it by more than its "
        f"own norm (Adam-family optimizers ignore the gradient's scale)."
    )


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
