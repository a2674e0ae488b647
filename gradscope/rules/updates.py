"""Weights that move too far at each step: the update-to-weight ratio ``|delta w| / |w|`` (the
``update_ratio`` probe) far above the ~1e-3 that Karpathy's "Recipe for Training Neural Networks"
calls healthy, on most measured steps after the first ``skip`` (Adam's first updates are lr x sign(g)
whatever the gradient, and schedules warm up): the learning rate is too high for those layers.

Weight matrices only (biases and norm gains are small, and move far relative to their size by design),
and never a weight that started from zeros (LoRA's B, zero-initialised output layers): its ratio is
infinite at its first update and shrinks as 1/steps after, which says nothing about the learning rate.
"""

from __future__ import annotations

import math
from typing import Any

from gradscope.report import Anomaly, Report
from gradscope.report.stats import median as median_of

PROBE = "update_ratio"


def update_ratio(report: Report, check: Any) -> list[Anomaly]:
    """One finding naming the matrix whose update ratio stays highest above ``check.high``, with every
    other matrix above it in the evidence."""
    series = {name: values[check.skip :] for name, values in _ratios(report).items()}
    high = {}
    for name, values in series.items():
        above = [step for step, ratio in values if ratio > check.high]
        if len(values) >= check.min_steps and len(above) >= check.fraction * len(values):
            high[name] = (median_of(r for _, r in values), above)
    if not high:
        return []
    worst = max(high, key=lambda n: high[n][0])
    median, steps = high[worst]
    lr = f" (lr {report.run.lr:g})" if report.run.lr is not None else ""
    return [
        Anomaly(
            kind="update_ratio",
            severity="warning",
            module=worst.rpartition(".")[0] or None,
            parameter=worst,
            step=steps[0],
            message=(
                f"each step moves {worst} by {median:.3g} of its norm (median |delta w|/|w| over "
                f"{len(series[worst])} steps, above {check.high:g} in {len(steps)} of them; about 1e-3 is "
                f"healthy){_others(len(high) - 1)}: the learning rate{lr} is too high for "
                f"{'this layer' if len(high) == 1 else 'these layers'}. Lower it, or "
                f"warm it up; a ratio far below 1e-3 instead means a layer barely learns."
            ),
            evidence={
                "median_ratio": median,
                "steps": steps,
                "threshold": check.high,
                "parameters": {name: value for name, (value, _) in sorted(high.items())},
            },
        )
    ]


def _others(count: int) -> str:
    if not count:
        return ""
    return f", and {count} other weight matri{'x moves' if count == 1 else 'ces move'} as fast"


def _ratios(report: Report) -> dict[str, list[tuple[int, float]]]:
    """Each weight matrix's (step, ratio) over the measured steps; a weight that started from zeros left out."""
    matrices = {p.name for p in report.parameters if p.trainable and len(p.shape) >= 2}
    series: dict[str, list[tuple[int, float]]] = {}
    for step in report.steps:
        for name, ratio in step.probes.get(PROBE, {}).items():
            if name in matrices:
                series.setdefault(name, []).append((step.step, ratio))
    return {name: values for name, values in series.items() if all(r != math.inf for _, r in values)}
