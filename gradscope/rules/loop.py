"""The training loop's own bugs, from what a watch saw around the gradients (``run.loop``): parameters
the optimizer does not hold, steps that do not move the weights, a step never taken, the model left
in eval mode. Nothing trains: error; a part of the model or of the run: warning."""

from __future__ import annotations

from typing import Any

from gradscope.report import Anomaly, LoopFacts, Report

NAMES_SHOWN = 8


def _facts(report: Report) -> LoopFacts | None:
    return report.run.loop


def _names(names: tuple[str, ...] | list[str]) -> str:
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return ", ".join(names[:NAMES_SHOWN]) + more


def not_in_optimizer(report: Report, check: Any) -> list[Anomaly]:
    """Parameters that get gradients but are in no param group of the optimizer."""
    loop = _facts(report)
    if loop is None or not loop.outside:
        return []
    names = loop.outside
    cause = (
        "the optimizer was built before they were created or replaced (a new head assigned after "
        "`optimizer = ...`), or it was given a subset of the parameters"
    )
    fix = (
        "build the optimizer once the model is final (or add them: optimizer.add_param_group({'params': [...]})); "
        "if they are meant to stay fixed, freeze them with requires_grad_(False)"
    )
    if loop.inside == 0:
        what = (
            f"none of the {len(names)} parameters that get gradients is in the optimizer ({_names(names)}): "
            f"nothing trains. The optimizer holds other tensors: {cause}, or it was built on another copy of the model"
        )
        severity = "error"
    else:
        what = f"{len(names)} parameter(s) get gradients but are in no optimizer param group, so they never train: {_names(names)}. Likely {cause}"
        severity = "warning"
    module = names[0].rpartition(".")[0]
    return [
        Anomaly(
            kind="not_in_optimizer",
            severity=severity,
            module=module or None,
            parameter=names[0],
            message=f"{what}. Fix: {fix}.",
            evidence={"parameters": list(names), "in_optimizer": loop.inside},
        )
    ]


def no_update(report: Report, check: Any) -> list[Anomaly]:
    """Optimizer steps that do not move the weights: a learning rate of 0, gradients cleared between
    ``backward()`` and ``step()``, no gradient at the step, or a sampled update of exactly zero."""
    loop = _facts(report)
    if loop is None or not loop.optimizer or loop.checked == 0:
        return []
    n = loop.checked
    out = []
    evidence = {"steps": n, "moved_checked": loop.moved_checked, "unmoved_steps": loop.unmoved_steps}
    evidence["sampled"] = list(loop.sampled)
    moved = _moved(loop)
    if loop.cleared_all_steps and _judged(loop.cleared_all_steps, n, check):
        placement = "zero_grad(set_to_none=False)" if loop.cleared_to == "zeros" else "zero_grad()"
        out.append(
            _finding(
                loop.cleared_all_steps,
                n,
                "cleared",
                f"the gradients were cleared between backward() and optimizer.step() at {loop.cleared_all_steps} of "
                f"{n} steps (they arrived in backward and were {loop.cleared_to} at the step){moved}: {placement} is "
                f"called after backward() and before step() (in the loop, or in a hook that runs between them: "
                f"Lightning's on_after_backward or on_before_optimizer_step, a Trainer callback's "
                f"on_pre_optimizer_step). Call optimizer.zero_grad() before the forward (or "
                f"right after optimizer.step()), never between backward() and step()",
                evidence,
            )
        )
    elif loop.cleared_steps > loop.cleared_all_steps and _judged(loop.cleared_steps, n, check):
        out.append(_part_cleared(loop, n, evidence))
    if loop.lr_zero_steps and _judged(loop.lr_zero_steps, n, check):
        out.append(
            _finding(
                loop.lr_zero_steps,
                n,
                "lr_zero",
                f"the learning rate is 0 in every param group at {loop.lr_zero_steps} of {n} optimizer steps "
                f"(from step {loop.lr_zero_first}){moved}: the weights do not change at those steps. A schedule "
                f"that yields 0 (total_steps / num_training_steps smaller than the run, a lambda that returns 0) or "
                f"lr=0 passed to the optimizer; a warm-up that starts at 0 is fine, a run that stays at 0 is not",
                evidence,
            )
        )
    if loop.no_gradient_steps and _judged(loop.no_gradient_steps, n, check):
        out.append(
            _finding(
                loop.no_gradient_steps,
                n,
                "no_gradient",
                f"no parameter of the optimizer had a gradient at {loop.no_gradient_steps} of {n} optimizer steps"
                f"{moved}: optimizer.step() ran before backward() (or backward() reached none of its parameters). "
                f"Order the loop zero_grad(), forward, backward(), step()",
                evidence,
            )
        )
    if not out and loop.moved_checked and _judged(loop.unmoved_steps, loop.moved_checked, check):
        out.append(
            _finding(
                loop.unmoved_steps,
                loop.moved_checked,
                "unmoved",
                f"the optimizer stepped but no sampled weight moved in {loop.unmoved_steps} of {loop.moved_checked} "
                f"measured updates ({_names(loop.sampled)}), with gradients present and a learning rate above 0"
                f"{_lr(report)}: an update too small to change the weights at their precision (a mis-typed or "
                f"decayed learning rate: lr x gradient below ~1e-7 of a weight in float32, ~1e-3 in bfloat16), "
                f"weights put back after each step (a load_state_dict or copy in the loop), or an optimizer "
                f"setting that cancels the update. Check the learning rate the optimizer uses at the step",
                evidence,
            )
        )
    return out


def _part_cleared(loop: LoopFacts, steps: int, evidence: dict[str, Any]) -> Anomaly:
    """Part of the gradients cleared between backward and step: those parameters do not train."""
    names = loop.cleared
    return Anomaly(
        kind="no_update",
        severity="warning",
        module=names[0].rpartition(".")[0] or None if names else None,
        parameter=names[0] if names else None,
        message=(
            f"the gradients of {len(names)} parameter(s) were cleared between backward() and optimizer.step() "
            f"at {loop.cleared_steps} of {steps} steps ({_names(names)}; set to {loop.cleared_to}), so the "
            f"optimizer does not train them while the rest of the model trains: a zero_grad() or `p.grad = None` "
            f"on part of the model after backward() (in a hook such as on_before_optimizer_step or "
            f"on_pre_optimizer_step). To keep them fixed, freeze them with requires_grad_(False), which skips "
            f"their backward too; otherwise clear gradients only before the forward or after optimizer.step()."
        ),
        evidence={**evidence, "cause": "cleared_part", "count": loop.cleared_steps, "parameters": list(names)},
    )


def _lr(report: Report) -> str:
    lr = report.run.lr
    return f" (lr {lr:g} in the first group)" if lr is not None else ""


def _judged(count: int, steps: int, check: Any) -> bool:
    """Every step (nothing trains), or more than ``fraction`` of them (a warm-up from 0 is one step)."""
    return count == steps or count > check.fraction * steps


def _moved(loop: LoopFacts) -> str:
    if not loop.moved_checked:
        return ""
    if loop.unmoved_steps == loop.moved_checked:
        return "; no sampled weight moved in any measured update"
    return f"; the sampled weights did not move in {loop.unmoved_steps} of {loop.moved_checked} measured updates"


def _finding(count: int, steps: int, cause: str, message: str, evidence: dict[str, Any]) -> Anomaly:
    every = count == steps
    tail = " Nothing trains." if every else ""
    return Anomaly(
        kind="no_update",
        severity="error" if every else "warning",
        message=message + "." + tail,
        evidence={**evidence, "cause": cause, "count": count},
    )


def step_not_called(report: Report, check: Any) -> list[Anomaly]:
    """Backward ran but no step was ever recorded: ``optimizer.step()`` (or ``scope.step()``) was never called."""
    loop = _facts(report)
    steps = report.retained.totals.steps if report.retained is not None else len(report.steps)
    if loop is None or loop.backwards == 0 or steps > 0 or loop.updates > 0:
        return []
    if loop.optimizer:
        message = (
            f"backward() ran {loop.backwards} time(s) but optimizer.step() was never called: the weights never "
            f"changed and there is no step to report. Call optimizer.step() after backward() (and clipping)."
        )
    else:
        message = (
            f"backward() ran {loop.backwards} time(s) but no step was recorded: without an optimizer, call "
            f"scope.step() after backward() (or pass optimizer= to gradscope.watch)."
        )
    return [Anomaly(kind="step_not_called", severity="error", message=message, evidence={"backwards": loop.backwards})]


def eval_mode(report: Report, check: Any) -> list[Anomaly]:
    """The model (its root module) in eval mode while it trains, with the modules that changes."""
    loop = _facts(report)
    if loop is None or not loop.eval_steps or not loop.eval_affected:
        return []
    n, affected = loop.checked, loop.eval_affected
    return [
        Anomaly(
            kind="eval_mode",
            severity="warning",
            module=affected[0].partition(" (")[0].replace("(model)", "") or None,
            step=loop.eval_first,
            message=(
                f"the model is in eval mode while it trains ({loop.eval_steps} of {n} optimizer steps, from step "
                f"{loop.eval_first}): {_names(affected)} behave as at inference (Dropout off, BatchNorm normalising "
                f"with running statistics it no longer updates). Call model.train() before the training loop, and "
                f"again after each evaluation."
            ),
            evidence={"steps": loop.eval_steps, "modules": list(affected)},
        )
    ]
