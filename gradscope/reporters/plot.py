"""The gradient-flow picture: per-layer gradient norms from input to output, one line per step,
with findings marked where they start, and dead/saturated fractions per activation.

matplotlib is optional (``pip install gradscope[plot]``); without it, asking for a
picture is a clear error rather than a crash.
"""

from __future__ import annotations

import math
from typing import Any

from gradscope.errors import GradscopeError
from gradscope.report import Report, StepRecord

SEVERITY_COLOR = {"error": "tab:red", "warning": "tab:orange", "info": "tab:blue"}


def require_matplotlib() -> Any:
    """The ``matplotlib.pyplot`` module with a file-only backend.

    Raises:
        GradscopeError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        raise GradscopeError(
            "--plot needs matplotlib: pip install 'gradscope[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(report: Report) -> Any:
    """A matplotlib figure of the report's gradient flow (the caller closes it)."""
    plt = require_matplotlib()
    activations = _activation_fractions(report)
    rows = 2 if activations else 1
    fig, axes = plt.subplots(rows, 1, figsize=(12, 4.5 * rows), squeeze=False)
    _flow(axes[0][0], report)
    if activations:
        _activations(axes[1][0], activations)
    fig.tight_layout()
    return fig


def _layers(report: Report) -> list[str]:
    """Weights and kernels (2-D and up), in forward order where known."""
    order = {name: i for i, name in enumerate(report.called_modules or ())}
    names = [p for p in report.parameters if p.trainable and len(p.shape) >= 2]
    names.sort(key=lambda p: order.get(p.module, len(order)))
    return [p.name for p in names]


def _flow(ax: Any, report: Report) -> None:
    layers = _layers(report)
    x = range(len(layers))
    plotted = False
    for step in report.steps:
        norms = [step.parameters[n].grad_norm if n in step.parameters else None for n in layers]
        values = [v if v and 0 < v < math.inf else math.nan for v in norms]
        plotted = plotted or any(not math.isnan(v) for v in values)
        ax.plot(x, values, marker="o", markersize=3, label=f"step {step.step}", alpha=0.8)
    position = {name: i for i, name in enumerate(layers)}
    for a in report.anomalies:
        where = _position(a, position)
        if where is not None:
            ax.axvline(where, color=SEVERITY_COLOR[a.severity], linestyle="--", alpha=0.7)
            ax.annotate(a.kind, (where, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top", fontsize=8)
    if plotted:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no finite, non-zero gradient norm to plot", transform=ax.transAxes, ha="center")
    ax.set_xticks(list(x))
    ax.set_xticklabels(layers, rotation=90, fontsize=7)
    ax.set_ylabel("gradient L2 norm")
    ax.set_title(f"gradient flow: {report.run.model}, input -> output")
    if len(report.steps) <= 12:
        ax.legend(fontsize=7)


def _position(anomaly: Any, position: dict[str, int]) -> int | None:
    if anomaly.parameter in position:
        return position[anomaly.parameter]
    module = (anomaly.module or "").split(" (call")[0]
    hits = [i for name, i in position.items() if module and name.startswith(module + ".")]
    return hits[0] if hits else None


def _activation_fractions(report: Report) -> dict[str, float]:
    """The last step's fraction per activation site."""
    step = report.steps[-1] if report.steps else None
    return {site: a.fraction for site, a in step.activations.items()} if step else {}


def _activations(ax: Any, fractions: dict[str, float]) -> None:
    sites = list(fractions)
    ax.bar(range(len(sites)), [fractions[s] for s in sites], color="tab:gray")
    ax.set_xticks(range(len(sites)))
    ax.set_xticklabels(sites, rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("dead (ReLU) / saturated fraction")


class PlotReporter:
    """Saves the gradient-flow picture as a PNG.

    Args:
        path: the image file.
    """

    def __init__(self, path: str) -> None:
        require_matplotlib()
        self.path = path

    def on_step(self, step: StepRecord) -> None:
        return None  # writes the whole report at the end

    def write(self, report: Report) -> None:
        if not report.steps:
            return
        plt = require_matplotlib()
        fig = figure(report)
        fig.savefig(self.path, dpi=110)
        plt.close(fig)

    def close(self) -> None:
        return None
