"""The gradient-flow picture: per-layer gradient norms from input to output, one line per step,
with findings marked where they start, and dead/saturated fractions per activation.

matplotlib is optional (``pip install gradscope[plot]``); without it, asking for a
picture is a clear error rather than a crash.
"""

from __future__ import annotations

import bisect
import io
import math
from pathlib import Path
from typing import Any

from gradscope.errors import GradscopeError
from gradscope.report import Report, StepRecord
from gradscope.rules.common import forward_position
from gradscope.utils import outfiles

SEVERITY_COLOR = {"error": "tab:red", "warning": "tab:orange", "info": "tab:blue"}
LEGEND_STEPS = 10  # more steps than this: a colour bar instead of a legend, and a heat map panel
HEAT_MIN_CELLS = 150  # a step alone among steps not recorded is drawn at least 1/150 of the heat map wide
# How a layer's state is marked on the flow panel: (y in axes fraction, marker, colour).
MARKS = {"NaN/Inf": (0.97, "X", "red"), "zero": (0.03, "v", "black"), "no gradient": (0.03, "o", "0.6")}


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
    """A matplotlib figure of the report's gradient flow (the caller closes it).

    Panels: per-layer norms per step (lines coloured by step, NaN/Inf, zero and missing gradients
    marked on their layer); for a long run a layer x step heat map; dead/saturated fractions.
    """
    plt = require_matplotlib()
    activations = _activation_fractions(report)
    heat = len(report.steps) > LEGEND_STEPS
    rows = 1 + heat + bool(activations)
    fig, axes = plt.subplots(rows, 1, figsize=(12, 4.5 * rows), squeeze=False)
    panels = iter(axes[:, 0])
    _flow(next(panels), report, plt)
    if heat:
        _heat_map(next(panels), report, plt, fig)
    if activations:
        _activations(next(panels), activations)
    fig.tight_layout()
    return fig


def _layers(report: Report) -> list[str]:
    """Weights and kernels (2-D and up), in forward order where known."""
    order = {name: i for i, name in enumerate(report.called_modules or ())}
    names = [p for p in report.parameters if p.trainable and len(p.shape) >= 2]
    names.sort(key=lambda p: forward_position(order, p.module))
    return [p.name for p in names]


def _states(report: Report, layers: list[str]) -> dict[str, list[int]]:
    """Per state (``nonfinite``, ``zero``, ``no grad``), the layer positions in that state at some step."""
    out: dict[str, set[int]] = {state: set() for state in MARKS}
    for step in report.steps:
        for i, name in enumerate(layers):
            s = step.parameters.get(name)
            if s is None or not s.received:
                out["no gradient"].add(i)
            elif s.nan_count or s.inf_count or not math.isfinite(s.grad_norm or 0.0):
                out["NaN/Inf"].add(i)
            elif s.grad_norm == 0:
                out["zero"].add(i)
    return {state: sorted(found) for state, found in out.items()}


def _flow(ax: Any, report: Report, plt: Any) -> None:
    layers = _layers(report)
    x = list(range(len(layers)))
    steps = report.steps
    colours = plt.get_cmap("viridis")
    span = max(steps[-1].step - steps[0].step, 1)
    plotted = False
    for step in steps:
        norms = [step.parameters[n].grad_norm if n in step.parameters else None for n in layers]
        values = [v if v and 0 < v < math.inf else math.nan for v in norms]
        plotted = plotted or any(not math.isnan(v) for v in values)
        colour = colours((step.step - steps[0].step) / span) if len(steps) > 1 else "tab:blue"
        ax.plot(x, values, marker="o", markersize=3, color=colour, label=f"step {step.step}", alpha=0.8, lw=1.2)
    if plotted:
        ax.set_yscale("log")
    else:
        ax.set_yticks([])
        ax.text(
            0.5,
            0.5,
            "no finite, non-zero gradient norm: see the marked layers",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=10,
            color="0.3",
        )
    _mark_states(ax, _states(report, layers))
    _mark_findings(ax, report, {name: i for i, name in enumerate(layers)})
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=90, fontsize=7)
    ax.set_xlim(-0.5, len(layers) - 0.5)
    ax.set_ylabel("gradient L2 norm")
    ax.set_title(
        f"gradient flow: {report.run.model}, input -> output ({len(steps)} step{'s' if len(steps) > 1 else ''})",
        loc="left",
    )
    if len(steps) > LEGEND_STEPS:
        bar = plt.colorbar(
            plt.cm.ScalarMappable(norm=plt.Normalize(steps[0].step, steps[-1].step), cmap=colours), ax=ax, pad=0.01
        )
        bar.set_label("step")
    handles, labels = ax.get_legend_handles_labels()
    keep = [(h, lab) for h, lab in zip(handles, labels) if len(steps) <= LEGEND_STEPS or not lab.startswith("step ")]
    if keep:
        # Above the panel's right corner: outside the data, clear of a colour bar.
        ax.legend(*zip(*keep), fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=4, borderaxespad=0.2)


def _mark_states(ax: Any, states: dict[str, list[int]]) -> None:
    """A marker on each layer's tick position in a band at the top (NaN/Inf) or bottom (zero, no gradient)."""
    band = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for state, positions in states.items():
        if not positions:
            continue
        y, marker, colour = MARKS[state]
        ax.scatter(
            positions,
            [y] * len(positions),
            transform=band,
            marker=marker,
            s=60,
            color=colour,
            label=f"{state} ({len(positions)} layers)",
            zorder=5,
            clip_on=False,
        )
        if state == "NaN/Inf":
            for i in positions:
                ax.axvspan(i - 0.4, i + 0.4, color=colour, alpha=0.08, lw=0)


def _mark_findings(ax: Any, report: Report, position: dict[str, int]) -> None:
    for a in report.anomalies:
        where = _position(a, position)
        if where is not None:
            ax.axvline(where, color=SEVERITY_COLOR[a.severity], linestyle="--", alpha=0.7)
            ax.annotate(
                a.kind,
                (where, 0.9),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                fontsize=8,
                xytext=(3, 0),
                textcoords="offset points",
            )


def _heat_map(ax: Any, report: Report, plt: Any, fig: Any) -> None:
    """Layers x steps, log10 of the gradient norm; NaN/Inf red, zero or no gradient black.

    Each step is drawn at its own step on the x axis: a long run that kept only some steps in full
    leaves the steps between them blank (hatched), not filled by the kept steps' columns.
    """
    layers = _layers(report)
    grid = [[_heat_value(step.parameters.get(name)) for name in layers] for step in report.steps]
    finite = [v for row in grid for v in row if math.isfinite(v)]
    # cividis, not the step colours of the panel above; NaN/Inf red ("bad"), zero black ("under").
    cmap = plt.get_cmap("cividis").with_extremes(bad="red", under="black")
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    # A zero is drawn one decade under the range (infinities would be masked like NaN).
    grid = [[low - 1 if v == -math.inf else v for v in row] for row in grid]
    edges = [-0.5 + i for i in range(len(layers) + 1)]
    blocks = _step_blocks(report)
    for first, last, xs in blocks:
        columns = [list(row) for row in zip(*grid[first:last])]
        image = ax.pcolormesh(xs, edges, columns, cmap=cmap, vmin=low, vmax=high if high > low else low + 1)
    bar = fig.colorbar(image, ax=ax, pad=0.01, extend="min")
    bar.set_label("log10 gradient norm (red: NaN/Inf, black: zero or none)")
    ax.set_xlim(blocks[0][2][0], blocks[-1][2][-1])
    ax.set_ylim(len(layers) - 0.5, -0.5)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=6 if len(layers) > 30 else 7)
    ax.set_xlabel("step")
    title = "gradient norm per layer and step (input at the top)"
    kept = len(report.steps)
    total = len(report.retained.series.step) if report.retained is not None else kept
    if total > kept:
        ax.add_patch(
            plt.Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, hatch="///", color="0.85", zorder=0)
        )
        title += f"; {kept} of {total} steps recorded in full, hatched: not recorded"
    ax.set_title(title)


def _heat_value(s: Any) -> float:
    """A cell's value: log10 of the gradient norm; NaN for NaN/Inf (the "bad" colour); -inf for zero or none."""
    v = s.grad_norm if s is not None else None
    if v is not None and not math.isfinite(v):
        return math.nan
    return math.log10(v) if v else -math.inf


def _step_blocks(report: Report) -> list[tuple[int, int, list[float]]]:
    """The kept steps as blocks of neighbours (no step of the run between them): each block's first
    and end index in ``report.steps`` and its cells' x edges, each cell centred on its step. A cell
    next to steps not recorded is at least ``1 / HEAT_MIN_CELLS`` of the axis wide, to be seen."""
    steps = [s.step for s in report.steps]
    series = report.retained.series.step if report.retained is not None else steps
    half = max(0.5, (steps[-1] - steps[0]) / HEAT_MIN_CELLS / 2)
    blocks: list[tuple[int, int, list[float]]] = []
    start = 0
    for i in range(1, len(steps) + 1):
        if i < len(steps) and bisect.bisect_left(series, steps[i]) - bisect.bisect_right(series, steps[i - 1]) == 0:
            continue  # steps[i] follows steps[i - 1] in the run: the same block
        inner = [(a + b) / 2 for a, b in zip(steps[start : i - 1], steps[start + 1 : i])]
        left = max(steps[start] - half, (steps[start - 1] + steps[start]) / 2 if start else -math.inf)
        right = min(steps[i - 1] + half, (steps[i - 1] + steps[i]) / 2 if i < len(steps) else math.inf)
        blocks.append((start, i, [left, *inner, right]))
        start = i
    return blocks


def _position(anomaly: Any, position: dict[str, int]) -> int | None:
    """The layer a finding is drawn at: its parameter, else the first weight of its module or, for a
    module without weights (an activation), of the nearest enclosing module that has one."""
    if anomaly.parameter in position:
        return position[anomaly.parameter]
    module = (anomaly.module or "").split(" (call")[0]
    while module:
        hits = [i for name, i in position.items() if name.startswith(module + ".")]
        if hits:
            return hits[0]
        module = module.rpartition(".")[0]
    return None


def _activation_fractions(report: Report) -> dict[str, float]:
    """The last step's fraction per activation site."""
    step = report.steps[-1] if report.steps else None
    return {site: a.fraction for site, a in step.activations.items()} if step else {}


def _activations(ax: Any, fractions: dict[str, float]) -> None:
    sites = list(fractions)
    values = [fractions[s] for s in sites]
    colours = ["tab:orange" if v >= 0.5 else "tab:gray" for v in values]  # 0.5: the checks' default fraction
    ax.bar(range(len(sites)), values, color=colours)
    if not any(values):
        ax.text(0.5, 0.5, "no dead or saturated units", transform=ax.transAxes, ha="center", color="0.3")
    ax.set_xticks(range(len(sites)))
    ax.set_xticklabels(sites, rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("dead (ReLU) / saturated fraction")
    ax.set_title("activations, last step (orange: at least half dead or saturated)")


def image_format(path: str) -> str:
    """The picture's format, from the file's extension (png without one, or on stdout).

    Raises:
        GradscopeError: matplotlib cannot write that format.
    """
    suffix = "" if path == outfiles.STDOUT else Path(path).suffix.lower().lstrip(".")
    if not suffix:
        return "png"
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise outfiles.OutputError(
            "--plot", path, f"matplotlib cannot write .{suffix}; use one of: {', '.join(formats)}"
        )
    return suffix


class PlotReporter:
    """Saves the gradient-flow picture as a PNG.

    Args:
        path: the image file.
    """

    def __init__(self, path: str) -> None:
        require_matplotlib()
        image_format(path)
        self.path = path

    def on_step(self, step: StepRecord) -> None:
        return None  # writes the whole report at the end

    def write(self, report: Report) -> None:
        if not report.steps:
            return
        plt = require_matplotlib()
        fig = figure(report)
        buffer = io.BytesIO()
        try:
            fig.savefig(buffer, dpi=110, format=image_format(self.path))
        finally:
            plt.close(fig)
        outfiles.write_bytes("--plot", self.path, buffer.getvalue())

    def close(self) -> None:
        return None
