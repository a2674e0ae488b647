"""Gradient flow: vanishing and exploding gradients along the model's depth, and stale gradients.

Depth is compared block by block (``rules.depth``), and what zero-initialised
partners explain is left out, so LoRA's ``A``, the query and key weights of an
attention block at init, or a ReZero branch are not read as a network whose
early layers starve.
"""

from __future__ import annotations

from typing import Any

from gradscope.report import Anomaly, ParamInfo, Report, StepRecord, tables
from gradscope.rules.applied import REFERENCE_LR, Update, aftermath, scale_free, updates
from gradscope.rules.common import clean_steps, median, per_report, weights_in_order
from gradscope.rules.depth import Partner, by_block, explained, zero_partners

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
    """Relative gradients that grow toward the input (block by block), or an update that the step
    applied (after clipping, at the optimizer's learning rate) larger than the weight itself, judged
    by what followed it: an error when the loss, the gradients or the units suffered, an info when
    the loss fell anyway, a warning when the run ended before anything could follow."""
    weights, modules, _ = _judged(report)
    names = [p.name for p in weights]
    large: list[Anomaly] = []  # a finding per step whose update was too large, the first harmful one wins
    for step in clean_steps(report):
        rel = _relative(step, weights)
        if not rel:
            continue
        blocks = by_block(rel, modules)
        if len(blocks) >= 2:
            first, last = _ends([m for _, m, _ in blocks])
            if first / last > check.ratio:
                return [_growing(report, step, rel, blocks, first, last)]
        moved = updates(report, step, names)
        if moved and moved[0].ratio > check.relative * REFERENCE_LR:
            large.append(_too_large(report, step, rel, moved[0], check))
            if large[-1].severity == "error":
                return [large[-1]]
    return large[:1]


FIX = " Usual fixes: smaller init (He/Xavier scale), normalisation, residual scaling, gradient clipping, a lower learning rate."


def _evidence(report: Report, step: StepRecord, rel: list[tuple[str, float]]) -> dict[str, Any]:
    evidence = {
        "relative_gradient": dict(rel),
        "grad_norm_total": step.grad_norm_total,
        "optimizer": (report.run.optimizer or "").lower() or None,
    }
    if report.run.lr is not None and not scale_free(report):
        evidence["lr"] = report.run.lr
    return evidence


def _growing(
    report: Report, step: StepRecord, rel: list[tuple[str, float]], blocks: Blocks, first: float, last: float
) -> Anomaly:
    name = max(rel, key=lambda item: item[1])[0]
    return Anomaly(
        kind="exploding_gradient",
        severity="error",
        module=name.rpartition(".")[0],
        parameter=name,
        step=step.step,
        message=(
            f"gradients grow toward the input: the median |grad|/|weight| of a block's weights is {first:.2e} "
            f"at {blocks[0][0]} but {last:.2e} at {blocks[-1][0]} ({first / last:.1e}x larger)." + FIX
        ),
        evidence=_evidence(report, step, rel),
    )


def _too_large(report: Report, step: StepRecord, rel: list[tuple[str, float]], top: Update, check: Any) -> Anomaly:
    after = aftermath(report, step)
    harm = after.harm()
    severity = "error" if harm else ("info" if after.fell else "warning")
    moved = _moved(report, step, top, check)
    if harm:
        outcome = f" What followed: {harm}." + FIX
    elif after.fell:
        outcome = (
            f" Yet the run absorbs it: the loss fell from {after.loss:.4g} to {after.later_loss:.4g} (the median of "
            f"the {after.compared} step(s) after; a normalisation after the layer makes its scale irrelevant, for one). "
            f"Nothing to fix unless the loss stalls; a lower learning rate or clipping would shrink the step."
        )
    elif after.steps:
        outcome = " The loss did not fall after it (or was not seen): watch it over more steps." + FIX
    else:
        outcome = " The run ended before a later step could show what it did: run more steps to see." + FIX
    evidence = {
        **_evidence(report, step, rel),
        "update_ratio": top.ratio,
        "measured": top.measured,
        "clip_coefficient": top.coefficient,
        "threshold": check.relative * REFERENCE_LR,
        "aftermath": {"loss": after.loss, "later_loss": after.later_loss, "steps": after.steps, "harm": harm},
    }
    return Anomaly(
        kind="exploding_gradient",
        severity=severity,
        module=top.name.rpartition(".")[0],
        parameter=top.name,
        step=step.step,
        message=moved + outcome,
        evidence=evidence,
    )


def _moved(report: Report, step: StepRecord, top: Update, check: Any) -> str:
    """What was measured: the update the step applied to the weight, and how it was known."""
    optimizer = report.run.optimizer or "the optimizer"
    threshold = check.relative * REFERENCE_LR
    clipped = f" x clip coefficient {top.coefficient:.3g}" if top.coefficient < 1 else ", not clipped"
    if top.measured:
        how = f"measured by the update_ratio probe; |grad|/|weight| was {top.gradient:.3g}"
    elif report.run.lr is not None:
        how = f"{optimizer} at lr {report.run.lr:g} x |grad|/|weight| {top.gradient:.3g}{clipped}; momentum adds to it"
    else:
        how = (
            f"|grad|/|weight| {top.gradient:.3g}{clipped}, at an assumed SGD lr of {REFERENCE_LR:g}: the optimizer "
            f"is not known, and Adam-family optimizers ignore the gradient's scale"
        )
    return (
        f"the update applied at step {step.step} moved {top.name} by about {top.ratio:.3g}x its own norm ({how}; "
        f"threshold {threshold:g}x, from exploding_gradient.relative at lr {REFERENCE_LR:g})."
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
