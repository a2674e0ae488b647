"""Loss and gradient-norm spikes: a step far above the robust statistics of the steps before it.

A step spikes when its value is more than ``threshold`` robust standard deviations
(1.4826 x the median absolute deviation) above the median of the previous ``window``
clean steps, and at least ``factor`` times that median. The median and MAD are
those of OLMo-core's 6-sigma/128-step check made robust: one spike does not widen
the spread enough to hide the next, and a falling loss does not inflate it. The
``factor`` floor plays the part of Megatron-LM's "10x the largest loss seen": on
a quiet plateau six MADs can be a 1% wobble, which is not a spike. Nothing is
judged before ``min_steps`` clean steps (the warm-up, and its steep early drop).
Spiking steps less than ``SETTLE`` steps apart are one finding, at the first of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gradscope.report import Anomaly, Report, StepRecord
from gradscope.report.stats import median as median_of
from gradscope.rules.common import clean_steps

MAD_TO_SIGMA = 1.4826  # the MAD of a normal distribution is 0.6745 sigma
TOP_LAYERS = 3  # layers named in a finding
MAX_FINDINGS = 10  # spikes reported per kind; a run that spikes more is said to, in the last one
FLOOR = 0.01  # a jump smaller than this share of the run's early scale is noise (a loss gone to ~0)
SETTLE = 16  # a spike within this many steps of the last one is the same episode (its aftermath)
NONFINITE = ("nonfinite_forward", "nonfinite_loss", "nonfinite_gradient")
SPIKES = ("loss_spike", "gradient_spike")


@dataclass(frozen=True)
class Spike:
    """One step's value against the window before it."""

    step: int
    value: float
    median: float
    sigma: float  # robust standard deviation of the window
    window: int  # how many steps the window held

    @property
    def sigmas(self) -> float:
        return (self.value - self.median) / self.sigma if self.sigma > 0 else math.inf

    @property
    def ratio(self) -> float:
        return self.value / self.median if self.median > 0 else math.inf


def spike_against(window: Sequence[float], step: int, value: float, check: Any, scale: float = 0.0) -> Spike | None:
    """``value`` against the ``window`` of values before it: a ``Spike`` when it stands out, else None.

    ``scale``: the largest value of the run's first window; a jump below ``FLOOR`` of it is no spike
    (a memorised batch whose loss has gone to 1e-4 wobbles by 10x without meaning anything).
    """
    if len(window) < check.min_steps or not math.isfinite(value):
        return None
    median = median_of(window)
    sigma = MAD_TO_SIGMA * median_of([abs(v - median) for v in window])
    spike = Spike(step, value, median, sigma, len(window))
    above = value - median > check.threshold * sigma
    large = (median <= 0 or value >= check.factor * median) and value - median > FLOOR * scale
    return spike if above and large and value > median else None


def loss_spike(report: Report, check: Any) -> list[Anomaly]:
    """Steps whose loss stands far above the recent steps' (a bad batch, a learning rate too high)."""
    return _findings(report, check, "loss_spike", lambda s: s.loss)


def gradient_spike(report: Report, check: Any) -> list[Anomaly]:
    """Steps whose total gradient norm (before clipping) stands far above the recent steps'."""
    return _findings(report, check, "gradient_spike", lambda s: s.grad_norm_total)


def _findings(report: Report, check: Any, kind: str, value: Callable[[StepRecord], float | None]) -> list[Anomaly]:
    steps = [s for s in clean_steps(report) if value(s) is not None]
    episodes = _episodes(_series(report, kind, steps, value), check)
    by_step = {s.step: s for s in steps}
    found = [_anomaly(kind, episode, by_step, steps, check) for episode in episodes[:MAX_FINDINGS]]
    if len(episodes) > MAX_FINDINGS:
        last = found[-1]
        more = f" The run spiked {len(episodes)} times; the first {MAX_FINDINGS} are reported."
        found[-1] = replace(last, message=last.message + more, evidence={**last.evidence, "spikes": len(episodes)})
    return found


def _series(
    report: Report, kind: str, steps: list[StepRecord], value: Callable[[StepRecord], float | None]
) -> list[tuple[int, float]]:
    """(step, value) of every clean step: from the run's series when only some steps are kept in full."""
    if report.retained is None:
        return [(s.step, value(s)) for s in steps]  # type: ignore[misc]
    series = report.retained.series
    column = series.loss if kind == "loss_spike" else series.grad_norm_total
    return [(step, v) for step, v, clean in zip(series.step, column, series.clean) if clean and v is not None]


def _episodes(series: list[tuple[int, float]], check: Any) -> list[list[Spike]]:
    """Spiking steps grouped into episodes; each step judged against the ``window`` steps before it."""
    episodes: list[list[Spike]] = []
    scale = 0.0  # early_scale of the steps before this one, kept running
    for i, (step, value) in enumerate(series):
        window = [v for _, v in series[max(0, i - check.window) : i]]
        spike = spike_against(window, step, value, check, scale)
        if i < check.window:
            scale = max(scale, abs(value))
        if spike is None:
            continue
        if episodes and step - episodes[-1][-1].step <= SETTLE:
            episodes[-1].append(spike)
        else:
            episodes.append([spike])
    return episodes


def _anomaly(
    kind: str, episode: list[Spike], by_step: dict[int, StepRecord], steps: list[StepRecord], check: Any
) -> Anomaly:
    first = episode[0]
    peak = max(episode, key=lambda s: s.value)
    at = by_step.get(first.step)  # None: past the steps a long run keeps in full
    # The steps kept in full within the window before it (a long run keeps the run-up to each finding).
    before = [s for s in steps if first.step - check.window <= s.step < first.step]
    layers = layer_jumps(at, before) if at is not None else []
    what = "loss" if kind == "loss_spike" else "total gradient norm"
    last = episode[-1].step
    lasted = f" It recurred until step {last} (peak {peak.value:.4g} at step {peak.step})." if len(episode) > 1 else ""
    named = ", ".join(f"{name or '(model)'} ({ratio:.3g}x its median)" for name, ratio in layers[:TOP_LAYERS])
    jumped = f" The layers whose own gradient norm jumped most: {named}." if named else ""
    return Anomaly(
        kind=kind,
        severity="warning",
        module=(layers[0][0] or None) if layers else None,
        step=first.step,
        message=(
            f"the {what} spiked at step {first.step}: {first.value:.4g} against a median of {first.median:.4g} over the "
            f"previous {first.window} steps ({_sigmas(first)} robust standard deviations above it, {first.ratio:.3g}x; "
            f"thresholds {check.threshold:g} and {check.factor:g}x).{lasted}{jumped} Usual causes: a bad batch (outliers, "
            f"corrupted or mislabelled samples), a learning rate too high for this point of training (the end of a "
            f"warm-up, a schedule jump), or growing attention logits; a spike that does not settle often ends in NaN."
        ),
        evidence={
            "value": first.value,
            "median": first.median,
            "sigma": first.sigma,
            "sigmas": first.sigmas,
            "ratio": first.ratio,
            "window": first.window,
            "steps": [s.step for s in episode],
            "peak": peak.value,
            "layers": dict(layers[: 2 * TOP_LAYERS]),
            "layer_history": [s.step for s in before],  # the steps each layer's median is taken over
        },
    )


def spike_finding(kind: str, spike: Spike, record: StepRecord, before: list[StepRecord], check: Any) -> Anomaly:
    """The finding of one spiking step as it is recorded (``before``: the steps kept before it)."""
    return _anomaly(kind, [spike], {record.step: record}, [*before, record], check)


def early_scale(values: Sequence[float], check: Any) -> float:
    """The largest of the run's first ``window`` clean values (Megatron's reference, its first 100)."""
    return max((abs(v) for v in values[: check.window]), default=0.0)


def layer_jumps(step: StepRecord, before: list[StepRecord]) -> list[tuple[str, float]]:
    """Each module's gradient norm at ``step`` over its median in ``before``, largest first."""
    jumps = []
    for name, stats in step.modules.items():
        history = [s.modules[name].grad_norm for s in before if name in s.modules]
        history = [h for h in history if h]
        if stats.grad_norm is None or not history:
            continue
        jumps.append((name, stats.grad_norm / median_of(history)))  # type: ignore[arg-type]
    return sorted(jumps, key=lambda item: -item[1])


def with_causes(found: list[Anomaly]) -> list[Anomaly]:
    """A NaN/Inf finding that a spike led up to names the spike as its likely cause."""
    spikes = [a for a in found if a.kind in SPIKES]
    out = []
    for anomaly in found:
        cause = _cause(anomaly, spikes) if anomaly.kind in NONFINITE else None
        if cause is not None:
            what = "loss" if cause.kind == "loss_spike" else "gradient norm"
            text = (
                f" It follows a {what} spike at step {cause.step} ({cause.evidence['value']:.4g}, "
                f"{cause.evidence['ratio']:.3g}x the median before it), its likely cause."
            )
            evidence = {**anomaly.evidence, "cause": {"kind": cause.kind, "step": cause.step}}
            anomaly = replace(anomaly, message=anomaly.message + text, evidence=evidence)
        out.append(anomaly)
    return out


def _cause(anomaly: Anomaly, spikes: list[Anomaly]) -> Anomaly | None:
    """The last spike before the NaN's step, when it ended at most its own window before it."""
    if anomaly.step is None:
        return None
    before = [s for s in spikes if s.step is not None and s.step < anomaly.step]
    near = [s for s in before if anomaly.step - s.evidence["steps"][-1] <= s.evidence["window"]]
    return max(near, key=lambda s: s.step or 0) if near else None


def _sigmas(spike: Spike) -> str:
    return f"{spike.sigmas:.0f}" if math.isfinite(spike.sigmas) else "infinitely many"
