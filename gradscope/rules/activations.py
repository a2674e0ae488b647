"""Activations: dead ReLU units and saturated sigmoid/tanh outputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradscope.report import Anomaly, Report
from gradscope.rules.common import clean_steps


def dead_relu(report: Report, check: Any) -> list[Anomaly]:
    """ReLU units that output zero for every sample of the batch."""
    return _activation_rule(report, check, ("relu",), "dead_relu", _dead_message)


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
