"""Activations: dead ReLU units and saturated sigmoid/tanh outputs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from gradscope.report import Anomaly, Report
from gradscope.rules.applied import updates
from gradscope.rules.common import clean_steps, in_forward_order, weights_in_order


def dead_relu(report: Report, check: Any) -> list[Anomaly]:
    """ReLU units that output zero for every sample, more of them than the layer's sparsity explains.

    A sparse code leaves most units silent in any one batch by design: if the layer's units fire
    at density ``d`` (its values above 0: all of them come from the units that do fire), a healthy
    unit stays silent for ``n`` samples with probability about ``(1 - d) ** n``. Units count as dead
    only when the silent fraction exceeds that by more than sampling noise (three standard
    deviations of a binomial over the units). In a training loop the steps' samples add up (a unit
    silent throughout is silent in each step, so the steps' smallest dead fraction is judged); the
    CLI runs every step on one batch, whose samples count once. Units alive at first that are dead
    in every step from some step on died there: the finding says when, and names the update before.
    """
    found = []
    for site, series in _relu_series(report).items():
        judged = _dead_since(series, check, report.run.model_target is not None)
        if judged is None:
            continue
        k, samples, dead, expected = judged
        step, a = series[k]
        starved = _starved(report, step) if dead == 1.0 else None
        died = _died(report, series, k, dead) if k else ""
        found.append(
            Anomaly(
                kind="dead_relu",
                severity="error" if starved else "warning",
                module=a.module,
                step=step,
                message=died + _dead_message(a, dead, samples, expected) + _starved_message(starved, step),
                evidence={
                    "fraction": dead,
                    "units": a.units,
                    "samples": samples,
                    "source": a.source,
                    "site": site,
                    "live_density": _live_density(a, dead),
                    "silent_by_sparsity": expected,
                    **({"starved": starved} if starved else {}),
                    **({"died_at": step, "alive_at": series[0][0]} if k else {}),
                },
            )
        )
    return found


def _relu_series(report: Report) -> dict[str, list[tuple[int, Any]]]:
    """Each ReLU site's (step, stats) over the clean steps."""
    sites: dict[str, list[tuple[int, Any]]] = {}
    for step in clean_steps(report):
        for site, a in step.activations.items():
            if a.kind == "relu":
                sites.setdefault(site, []).append((step.step, a))
    return sites


def _dead_since(series: list[tuple[int, Any]], check: Any, repeated: bool) -> tuple[int, int, float, float] | None:
    """The earliest index from which the site is dead in every step (its units silent beyond what
    sparsity explains), with the samples seen since, the smallest dead fraction and the fraction
    sparsity alone would leave; None when it never is. ``repeated``: every step saw the same batch."""
    best = None
    dead, samples = 1.0, 0
    for k in range(len(series) - 1, -1, -1):
        a = series[k][1]
        dead = min(dead, a.fraction)
        if dead < check.fraction:
            break  # earlier suffixes only lower it
        samples = a.samples if repeated else samples + a.samples
        if samples < check.min_samples:
            continue
        expected, limit = _sparsity_limit(a, dead, samples)
        if dead > limit:
            best = (k, samples, dead, expected)
    return best


def _feeding(report: Report, module: str) -> str | None:
    """The weight that feeds a ReLU: the first weight inside its module (a functional relu in a
    block), else the last weight of a module called before it."""
    weights = weights_in_order(report)
    inside = [p.name for p in weights if p.module.startswith(module + ".") or p.module == module]
    if inside:
        return inside[0]
    order = {name: i for i, name in enumerate(report.called_modules or ())}
    at = order.get(module)
    before = [p.name for p in weights if at is not None and order.get(p.module, at) < at]
    return before[-1] if before else None


CAUSE = 0.1  # an update that moved a weight by this share of its norm or more: a likely cause


def _died(report: Report, series: list[tuple[int, Any]], k: int, dead: float) -> str:
    """``Units of `layers.1` died at step 3, after the step-2 update moved ...``: when they died,
    and the largest update applied just before."""
    step, a = series[k]
    before_step, before = series[k - 1]
    text = (
        f"units of {a.module} died at step {step} ({before.fraction:.0%} dead at step {before_step}, "
        f"{dead:.0%} from step {step} on)"
    )
    previous = next((s for s in reversed(clean_steps(report)) if s.step < step), None)
    moved = updates(report, previous, [p.name for p in weights_in_order(report)]) if previous else []
    if not moved:
        return text[0].upper() + text[1:] + ". "
    feeding = _feeding(report, a.module)
    top = next((u for u in moved if u.name == feeding), moved[0])
    how = "measured" if top.measured else f"lr x |grad|/|weight| {top.gradient:.3g}"
    clipped = f", clip coefficient {top.coefficient:.3g}" if top.coefficient < 1 else ""
    cause = ", its likely cause" if top.ratio >= CAUSE else ""
    return (
        f"{text[0].upper() + text[1:]}, after the step-{previous.step} update moved {top.name} by "  # type: ignore[union-attr]
        f"{top.ratio:.3g}x its norm ({how}{clipped}){cause}. "
    )


STARVED = 0.01  # at most this share of the entries upstream of the head with a non-zero gradient


def _starved(report: Report, at: int) -> dict[str, Any] | None:
    """At step ``at``, (almost) nothing upstream of the head gets a gradient: the head, the module
    nearest the loss, is all that can learn. The counts by entries, or None."""
    step = next((s for s in report.steps if s.step == at), None)
    params = [p for p in in_forward_order(report) if p.trainable]
    if step is None or len(params) < 2:
        return None
    head = params[-1].module
    upstream = [p for p in params if p.module != head]
    total = sum(p.numel for p in upstream)
    moving = 0.0
    for p in upstream:
        s = step.parameters.get(p.name)
        if s is not None and s.grad_norm:
            moving += p.numel * (1.0 - (s.zero_fraction or 0.0))
    if not total or moving > STARVED * total:
        return None
    return {"head": head, "upstream_entries": total, "with_gradient": int(moving), "parameters": len(upstream)}


def _starved_message(starved: dict[str, Any] | None, step: int) -> str:
    if not starved:
        return ""
    share = starved["with_gradient"] / starved["upstream_entries"]
    return (
        f" Nothing upstream of {starved['head'] or 'the head'} learns: at step {step}, {share:.1%} of the "
        f"{starved['upstream_entries']:,} entries of its {starved['parameters']} parameters get a non-zero gradient, "
        f"so only the head trains."
    )


def _live_density(a: Any, dead: float) -> float | None:
    """The layer's firing density (None when the probe did not count it, or nothing fires).

    Over all units, not only the live ones: those that fired were selected for firing, so their own
    density overstates a sparse code's, and heterogeneous codes leave more units silent than a
    common density predicts; the lower estimate keeps sparse codes from being called dead."""
    if a.density is None or dead >= 1.0 or a.density <= 0:
        return None
    return a.density


def _sparsity_limit(a: Any, dead: float, samples: int) -> tuple[float, float]:
    """The silent fraction a code of the live units' density leaves, and the most that sampling
    noise over ``a.units`` units allows."""
    density = _live_density(a, dead)
    if density is None:
        return 0.0, 0.0
    expected = (1.0 - density) ** samples
    noise = 3.0 * math.sqrt(expected * (1.0 - expected) / max(a.units, 1))
    return expected, expected + noise


def saturated_activation(report: Report, check: Any) -> list[Anomaly]:
    """Sigmoid/tanh units pinned at their bounds for every sample."""
    return _activation_rule(report, check, ("sigmoid", "tanh"), "saturated_activation", _saturated_message)


def _activation_rule(
    report: Report, check: Any, kinds: tuple[str, ...], kind: str, message: Callable[..., str]
) -> list[Anomaly]:
    seen: dict[str, Anomaly] = {}
    for step in clean_steps(report):
        for site, a in step.activations.items():
            if a.kind not in kinds or site in seen or a.samples < check.min_samples or a.fraction < check.fraction:
                continue
            seen[site] = Anomaly(
                kind=kind,
                severity="warning",
                module=a.module,
                step=step.step,
                message=message(a),
                evidence={
                    "fraction": a.fraction,
                    "units": a.units,
                    "samples": a.samples,
                    "source": a.source,
                    "site": site,
                },
            )
    return list(seen.values())


def _dead_message(a: Any, dead: float, samples: int, expected: float) -> str:
    at = f" ({a.source})" if a.source else ""
    blocked = " No gradient flows back through this layer." if dead == 1.0 else ""
    density = _live_density(a, dead)
    tested = (
        f" Tested against sparsity: the layer fires on {density:.1%} of its values, which alone would leave "
        f"{expected:.1%} of the units silent over {samples} samples; more are silent than that explains."
        if density is not None
        else " Tested against sparsity: none of its units fires on any sample."
    )
    return (
        f"{dead:.0%} of the {a.units} units of the ReLU in {a.module}{at} are dead: zero for all "
        f"{samples} samples, so they pass no gradient.{blocked}{tested} Usual causes: a learning rate too high, "
        f"negative biases, poor init. Fixes: lower LR, He init, LeakyReLU/GELU, normalisation before the ReLU."
    )


def _saturated_message(a: Any) -> str:
    at = f" ({a.source})" if a.source else ""
    bound = "0 or 1" if a.kind == "sigmoid" else "-1 or 1"
    return (
        f"{a.fraction:.0%} of the outputs of the {a.kind} in {a.module}{at} ({a.units} units x {a.samples} samples) "
        f"are within 0.01 of {bound}, where its derivative is near 0 and the gradient stops. Fixes: smaller init "
        f"(Xavier), normalisation before it, or a non-saturating activation."
    )
