"""Parameters the gradient does not reach: unused, routed around (idle experts), or starved to zero."""

from __future__ import annotations

import re
from typing import Any

from gradscope.report import Anomaly, ParamInfo, Report, StepRecord
from gradscope.rules.common import by_module, clean_steps, fully_dead, in_forward_order, step_count, totals
from gradscope.rules.depth import explained, zero_partners

# An expert of a mixture-of-experts layer: ``experts.3``, ``experts.expert_3`` (the group is the path before).
EXPERT = re.compile(r"^(?P<group>.*\bexperts)\.(?P<expert>[^.]+)(\..*)?$")
# A gap this wide in a step's |grad|/|weight| ratios separates rounding from learning.
ROUNDING = 1e-8


def unused_parameter(report: Report, check: Any) -> list[Anomaly]:
    """Trainable parameters that got no gradient in any step, grouped by module (idle experts aside)."""
    steps = [s for s in report.steps if s.backward_error is None]
    if not steps or _no_backward(report):
        return []
    run = totals(report)  # a long run: every step counts, not only those kept in full
    if run is not None:
        received = set(run.received)
        never = [p for p in report.parameters if p.trainable and p.name not in received]
    else:
        never = [
            p
            for p in report.parameters
            if p.trainable and not any(s.parameters[p.name].received or p.name in s.cleared for s in steps)
        ]
    idle = _idle_experts(report, never, steps)
    never = [p for p in never if p.name not in idle]
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
                message=f"{', '.join(names)} require a gradient but got none in {step_count(report)} step(s): {cause}.",
                evidence={
                    "parameters": names,
                    "module_called": module in called if report.called_modules is not None else None,
                },
            )
        )
    return out


def _no_backward(report: Report) -> bool:
    """The watched loop never called backward(): no parameter could get a gradient, and no_update
    (no gradient at the step) names that cause, not each module."""
    loop = report.run.loop
    return loop is not None and loop.backwards == 0


def _experts(report: Report) -> dict[str, dict[str, list[str]]]:
    """Expert groups: group path -> expert name -> its trainable parameters."""
    groups: dict[str, dict[str, list[str]]] = {}
    for p in report.parameters:
        m = EXPERT.match(p.name)
        if p.trainable and m:
            groups.setdefault(m["group"], {}).setdefault(m["expert"], []).append(p.name)
    return {g: e for g, e in groups.items() if len(e) >= 2}


def _idle_experts(report: Report, never: list[ParamInfo], steps: list[StepRecord]) -> set[str]:
    """Parameters of experts that got no tokens, in groups where some expert did: routing, not a fault."""
    missing = {p.name for p in never}
    idle: set[str] = set()
    for experts in _experts(report).values():
        unused = [e for e, names in experts.items() if all(n in missing for n in names)]
        if len(unused) < len(experts):
            idle.update(n for e in unused for n in experts[e])
    return idle


def expert_routing(report: Report, check: Any) -> list[Anomaly]:
    """Routing statistics of mixture-of-experts layers: experts that got no tokens, and load imbalance."""
    steps = [s for s in report.steps if s.backward_error is None]
    out = []
    for group, experts in _experts(report).items():
        loads = {e: _load(steps, names) for e, names in experts.items()}
        idle = [e for e, load in loads.items() if load == 0]
        if not idle or len(idle) == len(experts):
            continue  # all idle: nothing routes to the layer at all, which unused_parameter reports
        busy = [load for load in loads.values() if load > 0]
        out.append(
            Anomaly(
                kind="expert_routing",
                severity="info",
                module=group,
                message=(
                    f"{len(idle)} of the {len(experts)} experts of {group} got no tokens in any of {len(steps)} step(s) "
                    f"(experts {', '.join(idle[:8])}{'...' if len(idle) > 8 else ''}); the busy experts' gradient norms "
                    f"range {min(busy):.3g} to {max(busy):.3g}. That is routing, not an unused parameter: on a small "
                    f"batch some experts go idle. If it persists in training, check the router's load-balancing loss "
                    f"(its coefficient) and the capacity factor."
                ),
                evidence={"experts": len(experts), "idle": idle, "gradient_norm": loads},
            )
        )
    return out


def _load(steps: list[StepRecord], names: list[str]) -> float:
    """The largest gradient norm an expert's parameters got over the steps (0: never routed to)."""
    norms = [s.parameters[n].grad_norm or 0.0 for s in steps for n in names if n in s.parameters]
    return max(norms, default=0.0)


def zero_gradient(report: Report, check: Any) -> list[Anomaly]:
    """Gradients that arrive but are zero, or rounding-level next to every other layer's, in every step:
    one finding, placed where the flow of gradient stops (an all-zero weight, a gate that closes a branch,
    or else the starved parameter nearest the loss). Zero-initialised partners' branches are design."""
    steps, run = clean_steps(report), totals(report)
    if not steps or any(fully_dead(s) for s in steps) or (run is not None and run.fully_dead):
        return []  # a layer of dead ReLUs explains it; dead_relu reports that
    params = in_forward_order(report)
    skip = explained(zero_partners(report))
    if run is not None:  # a long run: judged on the kept steps, and on every step for a missing gradient
        skip = skip | set(run.missing)
    skip = skip | {name for s in steps for name in s.cleared}  # cleared before the step: no_update says so
    floors: dict[int, float | None] = {}
    zero = [p for p in params if p.trainable and p.name not in skip and _always_zero(p.name, steps, floors)]
    if not zero:
        return []
    exact = all(s.parameters[p.name].grad_norm == 0 for p in zero for s in steps)
    blank = [
        p
        for p in params
        if len(p.shape) >= 2 and steps[0].parameters.get(p.name) and steps[0].parameters[p.name].param_norm == 0
    ]
    gates = [p for p in zero if any(q is not p and _below(q.module, p.module) for q in zero)]
    if blank:
        place = blank[-1]
        cause = (
            f" These weights are all zeros: {', '.join(p.name for p in blank[:6])}. A zero weight passes no gradient "
            f"back and zero activations give the next layer none: initialise them randomly (zero init is only "
            f"safe for the last layer of a residual branch)."
        )
    elif gates:
        place = gates[-1]
        cause = (
            f" {place.name} gates the branch and is itself starved: it is closed (a multiplier at or near 0, a "
            f"saturated sigmoid) and nothing can open it. Initialise it open, or let its own gradient through."
        )
    else:
        place = zero[-1]
        cause = " The path from the loss is dead: a multiplication by 0, a constant output, or dead units after it."
    names = [p.name for p in zero]
    how = (
        "exactly zero"
        if exact
        else f"zero or rounding-level (|grad|/|weight| more than {1 / ROUNDING:.0e}x below every other layer's)"
    )
    return [
        Anomaly(
            kind="zero_gradient",
            severity="warning",
            module=place.module or None,
            parameter=place.name,
            step=steps[0].step,
            message=(
                f"no gradient flows back past {place.module or place.name}: the gradients of {len(names)} parameters "
                f"({', '.join(names[:6])}{'...' if len(names) > 6 else ''}) are {how} in every step.{cause}"
            ),
            evidence={"parameters": names, "zero_weights": [p.name for p in blank], "exact": exact},
        )
    ]


def _below(module: str, owner: str) -> bool:
    """``module`` lies strictly inside ``owner`` (every module lies inside the model, "")."""
    return module != owner and (not owner or module.startswith(owner + "."))


def _always_zero(name: str, steps: list[StepRecord], floors: dict[int, float | None]) -> bool:
    for s in steps:
        stats = s.parameters.get(name)
        if stats is None or not stats.received:
            return False
        if s.underflow and s.underflow.get(name, 0.0) > 0:
            return False  # fp32 keeps it: gradient_underflow reports that
        if stats.grad_norm != 0 and not _rounding(stats, floors, s):
            return False
    return True


def _rounding(stats: Any, floors: dict[int, float | None], step: StepRecord) -> bool:
    """A nonzero gradient below a gap of ``1 / ROUNDING`` in the step's |grad|/|weight| ratios: rounding,
    cut off from every other layer's (a smooth decay toward the input, which vanishing_gradient judges,
    has no such gap)."""
    if not stats.grad_to_param:
        return False
    if step.step not in floors:
        floors[step.step] = _rounding_floor(step)  # once per step, not once per parameter
    floor = floors[step.step]
    return floor is not None and stats.grad_to_param < floor


def _rounding_floor(step: StepRecord) -> float | None:
    """The smallest ratio above the largest gap of at least ``1 / ROUNDING``, or None."""
    ratios = sorted(t.grad_to_param for t in step.parameters.values() if t.grad_to_param)
    gaps = [(hi / lo, hi) for lo, hi in zip(ratios, ratios[1:]) if hi > lo / ROUNDING]
    return max(gaps)[1] if gaps else None
