"""Activations: dead ReLU units and saturated sigmoid/tanh outputs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from gradscope.report import Anomaly, Report
from gradscope.rules.common import clean_steps


def dead_relu(report: Report, check: Any) -> list[Anomaly]:
    """ReLU units that output zero for every sample, more of them than the layer's sparsity explains.

    A sparse code leaves most units silent in any one batch by design: if the layer's units fire
    at density ``d`` (its values above 0: all of them come from the units that do fire), a healthy
    unit stays silent for ``n`` samples with probability about ``(1 - d) ** n``. Units count as dead
    only when the silent fraction exceeds that by more than sampling noise (three standard
    deviations of a binomial over the units). In a training loop the steps' samples add up (a unit
    silent throughout is silent in each step, so the steps' smallest dead fraction is judged); the
    CLI runs every step on one batch, whose samples count once.
    """
    found = []
    for site, seen in _relu_sites(report).items():
        a, step, samples, dead = seen
        if samples < check.min_samples or dead < check.fraction:
            continue
        expected, limit = _sparsity_limit(a, dead, samples)
        if dead <= limit:
            continue
        found.append(
            Anomaly(
                kind="dead_relu",
                severity="warning",
                module=a.module,
                step=step,
                message=_dead_message(a, dead, samples, expected),
                evidence={
                    "fraction": dead,
                    "units": a.units,
                    "samples": samples,
                    "source": a.source,
                    "site": site,
                    "live_density": _live_density(a, dead),
                    "silent_by_sparsity": expected,
                },
            )
        )
    return found


def _relu_sites(report: Report) -> dict[str, tuple[Any, int, int, float]]:
    """Per ReLU site over the clean steps: its first stats, first step, samples seen in all, and the
    smallest dead fraction of any step."""
    sites: dict[str, tuple[Any, int, int, float]] = {}
    repeated = report.run.model_target is not None  # the CLI: every step on the same batch
    for step in clean_steps(report):
        for site, a in step.activations.items():
            if a.kind != "relu":
                continue
            if site not in sites:
                sites[site] = (a, step.step, a.samples, a.fraction)
            else:
                first, at, samples, dead = sites[site]
                more = 0 if repeated else a.samples
                sites[site] = (first, at, samples + more, min(dead, a.fraction))
    return sites


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
