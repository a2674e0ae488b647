"""The terminal report: a header, the per-step totals, findings, and a per-layer table.

Reads the report only. rich handles ``NO_COLOR`` and plain output when the
stream is not a terminal.
"""

from __future__ import annotations

import math
import os
from typing import IO

from rich.console import Console
from rich.console import Group as Stack
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gradscope.report import Anomaly, ParamInfo, ParamStats, Report, StepRecord
from gradscope.reporters.cells import num as _num
from gradscope.reporters.findings import group
from gradscope.reporters.layout import Column, fit
from gradscope.reporters.memory import memory_section
from gradscope.reporters.steps import steps_table
from gradscope.reporters.verdict import verdict, written

HEAD_ROWS = 15  # with a long table, the rows nearest the input ...
TAIL_ROWS = 15  # ... and nearest the loss are shown, plus every flagged row
# The per-parameter columns after the name, and the order in which they give way to a narrow
# terminal (None: always kept); non-finite stays, since it says where a NaN is.
LAYER_COLUMNS = (
    ("shape", 3),
    ("grad norm", None),
    ("grad/param", 4),
    ("max |g|", 1),
    ("zero %", 2),
    ("non-finite", None),
)
SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
# A weight whose root-mean-square entry is below this is (still) about zero: a zero-initialised bias
# or gain after a few updates of lr 1e-4..1e-3. |grad|/|weight| then measures the weight's smallness,
# not the gradient's size, so the column says so instead of showing a ratio of 100.
NEAR_ZERO_RMS = 1e-3


class TerminalReporter:
    """Prints a report with rich.

    Args:
        stream: where to print (stdout for results).
        show_all: every parameter row, however many.
    """

    def __init__(self, stream: IO[str], show_all: bool = False) -> None:
        width = None if stream.isatty() or os.environ.get("COLUMNS") else 140
        self.console = Console(file=stream, width=width, highlight=False)
        self.show_all = show_all

    def on_step(self, step: StepRecord) -> None:
        return None  # writes the whole report at the end

    def write(self, report: Report) -> None:
        if not report.steps:
            return  # nothing was measured; the error itself goes to stderr
        self.console.print(_header(report))
        self.console.print(steps_table(report, self.show_all))
        if report.anomalies or report.run.status == "completed":
            self.console.print(_findings(report.anomalies))
        self.console.print(_layer_table(report, _table_step(report), self.show_all, self.console.width))
        if report.memory is not None:
            self.console.print(memory_section(report.memory), no_wrap=True, overflow="ignore")
        if report.run.status != "completed":
            self.console.print(_status_line(report))

    def close(self) -> None:
        self.console.file.flush()


def _table_step(report: Report) -> StepRecord:
    """The step of the first error finding (where a NaN started, say), else the last step."""
    first = next((a.step for a in report.anomalies if a.severity == "error" and a.step is not None), None)
    return next((s for s in report.steps if s.step == first), report.steps[-1])


def _header(report: Report) -> Text:
    run = report.run
    frozen = run.parameters_total - run.parameters_trainable
    params = f"{run.parameters_total:,} parameters" + (f" ({frozen:,} frozen)" if frozen else "")
    text = Text()
    text.append("gradscope ", style="bold")
    text.append(f"{run.model}", style="bold cyan")
    text.append(f"  {params}  device {run.device}  precision {run.precision}")
    text.append(f"  steps {run.steps_completed}/{run.steps_requested}")
    if run.optimizer:
        text.append(f"  optimizer {run.optimizer}")
    if run.clip:
        text.append(f"  clip {run.clip['max_norm']:g} (L{run.clip['norm_type']:g})")
    if run.checkpointed_modules:
        text.append(f"  checkpointed {len(run.checkpointed_modules)} modules")
    if run.distributed:
        dist = run.distributed
        text.append(f"  {dist['strategy']} x{dist['world_size']} ({dist['backend']})")
    if run.batch:
        text.append(f"\nbatch: {run.batch}", style="dim")
    return text


def _with_gaps(items: list, keep: set[int]) -> list:
    """``items`` at the kept indices, with an int counting each run of left-out ones."""
    out: list = []
    skipped = 0
    for i, item in enumerate(items):
        if i in keep:
            if skipped:
                out.append(skipped)
            out.append(item)
            skipped = 0
        else:
            skipped += 1
    if skipped:
        out.append(skipped)
    return out


def _findings(anomalies: tuple[Anomaly, ...]) -> Text | Panel:
    if not anomalies:
        return Text("no anomalies found", style="green")
    groups = group(anomalies)
    text = Text()
    for i, g in enumerate(groups):
        text.append("\n" if i else "")
        text.append(f"{g.severity.upper():7} ", style=SEVERITY_STYLE.get(g.severity, ""))
        text.append(g.kind, style="bold")
        if len(g.anomalies) > 1:
            text.append(f" x{len(g.anomalies)}", style="bold")
        where = g.where()
        text.append(f" [{where}] " if where else " ")
        spread = g.spread()
        if len(g.anomalies) > 1:
            text.append(f"({spread}) " if spread else "")
            first = g.first.module or g.first.parameter
            text.append(f"The first{f', {first}' if first else ''}: ", style="dim")
        text.append(g.first.message + "\n")
        trace = _origin_trace(g.first)
        if trace:
            text.append(f"        origin: {trace}\n", style="dim")
    count = f"{len(groups)} finding(s)"
    if len(groups) < len(anomalies):
        count += f" ({len(anomalies)} in the JSON report)"
    worst = anomalies[0].severity
    return Panel(text, title=count, title_align="left", border_style=SEVERITY_STYLE[worst])


def _origin_trace(a: Anomaly) -> str:
    """``phase > module > op (node) @ source`` for NaN/Inf findings."""
    e = a.evidence
    if not a.kind.startswith("nonfinite") or "phase" not in e:
        return ""
    parts = [e["phase"], e.get("module"), e.get("op"), e.get("node"), e.get("source")]
    return " > ".join(str(p) for p in parts if p)


def _layer_table(report: Report, step: StepRecord, show_all: bool, width: int) -> Stack | Text:
    infos = [p for p in report.parameters if p.name in step.parameters]
    if not infos:
        why = " (backward raised before any gradient arrived)" if step.backward_error else ""
        return Text(f"per parameter, step {step.step}: no gradients{why}", style="yellow")
    rows = _visible_rows(infos, step, show_all)
    params = [r for r in rows if not isinstance(r, int)]
    cells = [_layer_cells(info, step.parameters[info.name]) for info in params]
    columns = [
        Column(header, [c[i] for c in cells], droppable=order is not None, drop_order=order or 0)
        for i, (header, order) in enumerate(LAYER_COLUMNS)
    ]
    labels = [info.name + (f" (= {', '.join(info.aliases)})" if info.aliases else "") for info in params]
    labels, kept = fit(labels, "parameter", columns, width)
    frozen = len(report.parameters) - len(infos)
    notes = [f"{frozen} frozen not shown"] if frozen else []
    if len(params) < len(infos):
        notes.append(f"{len(params)} of {len(infos)} rows, --all shows every row")
    left_out = [c.header for c in columns if c not in kept]
    if left_out:
        notes.append(f"{', '.join(left_out)} left out to fit {width} columns")
    title = f"per parameter, step {step.step}" + (f" ({'; '.join(notes)})" if notes else "")
    table = Table(box=None, pad_edge=False)
    table.add_column("parameter", justify="left", no_wrap=True)
    for column in kept:
        table.add_column(column.header, justify="left" if column.header == "shape" else "right", no_wrap=True)
    names = iter(zip(labels, cells))
    for item in rows:
        if isinstance(item, int):
            table.add_row(Text(f"... {item} more rows", style="dim"), *[""] * len(kept))
            continue
        label, row = next(names)
        styled = [_style(column.header, row[columns.index(column)]) for column in kept]
        table.add_row(Text(label), *styled)
    return Stack(Text(title), table)


def _visible_rows(infos: list[ParamInfo], step: StepRecord, show_all: bool) -> list[ParamInfo | int]:
    """The rows to print; an int stands for that many rows left out at that place."""
    if show_all or len(infos) <= HEAD_ROWS + TAIL_ROWS + 5:
        return list(infos)
    keep = {i for i in range(len(infos)) if i < HEAD_ROWS or i >= len(infos) - TAIL_ROWS}
    keep |= {i for i, info in enumerate(infos) if _flagged(step.parameters[info.name])}
    return _with_gaps(infos, keep)


def _flagged(stats: ParamStats) -> bool:
    return not stats.received or stats.nan_count > 0 or stats.inf_count > 0 or stats.zero_fraction == 1.0


def _layer_cells(info: ParamInfo, s: ParamStats) -> list[str]:
    """Plain texts of a parameter's row after its name: shape, then the LAYER_COLUMNS numbers."""
    shape = "x".join(map(str, info.shape)) or "scalar"
    if not s.received:
        return [shape, "no grad", "", "", "", ""]
    parts = [f"{s.nan_count} NaN" if s.nan_count else "", f"{s.inf_count} Inf" if s.inf_count else ""]
    nonfinite = " ".join(p for p in parts if p) or "0"
    zero = f"{100 * (s.zero_fraction or 0):.1f}"
    return [shape, _num(s.grad_norm), _ratio(info, s), _max_abs(info, s), zero, nonfinite]


def _ratio(info: ParamInfo, s: ParamStats) -> str:
    """|grad|/|weight|, or ``|w|~0`` where the weight is about zero and the ratio means nothing."""
    if s.param_norm is not None and info.numel and s.param_norm / math.sqrt(info.numel) < NEAR_ZERO_RMS:
        return "|w|~0"
    return _num(s.grad_to_param)


def _max_abs(info: ParamInfo, s: ParamStats) -> str:
    """Max |g|: Inf when any entry is infinite; NaN when no entry is finite (the probe's max over
    finite entries would read 0 there)."""
    if s.inf_count:
        return "Inf"
    if s.nan_count and s.nan_count >= info.numel:
        return "NaN"
    return _num(s.grad_max_abs)


def _style(header: str, cell: str) -> Text:
    if cell == "no grad":
        return Text(cell, style="yellow")
    if header == "non-finite" and cell != "0":
        return Text(cell, style="bold red")
    if cell == "|w|~0":
        return Text(cell, style="dim")
    if header == "zero %" and cell == "100.0":
        return Text(cell, style="yellow")
    return Text(cell)


def _status_line(report: Report) -> Text:
    run = report.run
    done = f"{run.steps_completed} of {run.steps_requested} steps completed"
    why = f": {run.error}" if run.error else ""
    cause = next((a for a in report.anomalies if "consequence" in a.evidence), None)
    if cause is not None:
        step = cause.evidence["consequence"]["step"]
        return Text(
            f"step {step} raised, a consequence of {cause.kind} at step {cause.step} ({done}){why}", style="red"
        )
    return Text(f"run {run.status} ({done}){why}", style="bold red")


def print_verdict(stream: IO[str], report: Report, code: int, fail_on: str, outputs: list[str | None]) -> None:
    """The files written, then the one-line verdict: the last thing on the screen.

    Args:
        stream: where the terminal report went.
        report: the finished (or partial) report.
        code: the exit code the command returns.
        fail_on: the ``--fail-on`` severity.
        outputs: paths the run was asked to write (missing ones and ``-`` are left out).
    """
    console = Console(file=stream, width=None if stream.isatty() else 400, highlight=False, soft_wrap=True)
    files = written(outputs)
    if files:
        console.print(files, style="dim")
    style = (
        "bold red"
        if code not in (0, 1) or report.at_or_above("error")
        else SEVERITY_STYLE.get(report.anomalies[0].severity if report.anomalies else "", "bold green")
    )
    console.print(verdict(report, code, fail_on), style=style)
    console.file.flush()
