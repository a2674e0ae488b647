"""The terminal report: a header, the per-step totals, findings, and a per-layer table.

Reads the report only. rich handles ``NO_COLOR`` and plain output when the
stream is not a terminal.
"""

from __future__ import annotations

import math
import os
from typing import IO

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gradscope.report import Anomaly, ParamInfo, ParamStats, Report, StepRecord

HEAD_ROWS = 15  # with a long table, the rows nearest the input ...
TAIL_ROWS = 15  # ... and nearest the loss are shown, plus every flagged row
SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


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
        self.console.print(_steps_table(report))
        if report.anomalies or report.run.status == "completed":
            self.console.print(_findings(report.anomalies))
        self.console.print(_layer_table(report, _table_step(report), self.show_all))
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


def _steps_table(report: Report) -> Table:
    steps = report.steps
    clip = any(s.clip_coefficient is not None for s in steps)
    amp = any(s.loss_scale is not None for s in steps)
    table = Table(title="per step", title_justify="left", box=None, pad_edge=False)
    for column in (
        ["step", "loss", "grad norm"]
        + (["clipped norm", "clip coef"] if clip else [])
        + (["loss scale", "update"] if amp else [])
    ):
        table.add_column(column, justify="right")
    for s in steps:
        row = [str(s.step), _num(s.loss), _num(s.grad_norm_total)]
        if clip:
            row += [_num(s.grad_norm_total_clipped), _num(s.clip_coefficient)]
        if amp:
            row += [_num(s.loss_scale), "skipped" if s.skipped else "applied"]
        table.add_row(*row)
    return table


def _findings(anomalies: tuple[Anomaly, ...]) -> Text | Panel:
    if not anomalies:
        return Text("no anomalies found", style="green")
    text = Text()
    for i, a in enumerate(anomalies):
        where = " ".join(
            x
            for x in (
                a.module or a.parameter or "",
                f"step {a.step}" if a.step is not None else "",
                f"rank {a.rank}" if a.rank is not None else "",
            )
            if x
        )
        text.append("\n" if i else "")
        text.append(f"{a.severity.upper():7} ", style=SEVERITY_STYLE.get(a.severity, ""))
        text.append(f"{a.kind}", style="bold")
        text.append(f" [{where}] " if where else " ")
        text.append(a.message + "\n")
        trace = _origin_trace(a)
        if trace:
            text.append(f"        origin: {trace}\n", style="dim")
    worst = anomalies[0].severity
    return Panel(text, title=f"{len(anomalies)} finding(s)", title_align="left", border_style=SEVERITY_STYLE[worst])


def _origin_trace(a: Anomaly) -> str:
    """``phase > module > op (node) @ source`` for NaN/Inf findings."""
    e = a.evidence
    if not a.kind.startswith("nonfinite") or "phase" not in e:
        return ""
    parts = [e["phase"], e.get("module"), e.get("op"), e.get("node"), e.get("source")]
    return " > ".join(str(p) for p in parts if p)


def _layer_table(report: Report, step: StepRecord, show_all: bool) -> Table:
    infos = [p for p in report.parameters if p.name in step.parameters]
    rows = _visible_rows(infos, step, show_all)
    frozen = len(report.parameters) - len(infos)
    title = f"per parameter, step {step.step}" + (f" ({frozen} frozen not shown)" if frozen else "")
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for column, justify in [
        ("parameter", "left"),
        ("shape", "left"),
        ("grad norm", "right"),
        ("grad/param", "right"),
        ("max |g|", "right"),
        ("zero %", "right"),
        ("non-finite", "right"),
    ]:
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for item in rows:
        if isinstance(item, int):
            table.add_row(Text(f"... {item} more rows (--all shows every row)", style="dim"), "", "", "", "", "", "")
        else:
            table.add_row(*_layer_row(item, step.parameters[item.name]))
    return table


def _visible_rows(infos: list[ParamInfo], step: StepRecord, show_all: bool) -> list[ParamInfo | int]:
    """The rows to print; an int stands for that many rows left out at that place."""
    if show_all or len(infos) <= HEAD_ROWS + TAIL_ROWS + 5:
        return list(infos)
    keep = {i for i in range(len(infos)) if i < HEAD_ROWS or i >= len(infos) - TAIL_ROWS}
    keep |= {i for i, info in enumerate(infos) if _flagged(step.parameters[info.name])}
    out: list[ParamInfo | int] = []
    skipped = 0
    for i, info in enumerate(infos):
        if i in keep:
            if skipped:
                out.append(skipped)
            out.append(info)
            skipped = 0
        else:
            skipped += 1
    return out


def _flagged(stats: ParamStats) -> bool:
    return not stats.received or stats.nan_count > 0 or stats.inf_count > 0 or stats.zero_fraction == 1.0


def _layer_row(info: ParamInfo, s: ParamStats) -> list[Text | str]:
    name = Text(info.name + (f" (= {', '.join(info.aliases)})" if info.aliases else ""))
    shape = "x".join(map(str, info.shape)) or "scalar"
    if not s.received:
        return [name, shape, Text("no grad", style="yellow"), "", "", "", ""]
    nonfinite = s.nan_count + s.inf_count
    bad = Text(f"{s.nan_count} NaN {s.inf_count} Inf", style="bold red") if nonfinite else Text("0")
    zero = Text(f"{100 * (s.zero_fraction or 0):.1f}", style="yellow" if s.zero_fraction == 1.0 else "")
    return [name, shape, _num(s.grad_norm), _num(s.grad_to_param), _num(s.grad_max_abs), zero, bad]


def _status_line(report: Report) -> Text:
    run = report.run
    done = f"{run.steps_completed} of {run.steps_requested} steps completed"
    why = f": {run.error}" if run.error else ""
    return Text(f"run {run.status} ({done}){why}", style="bold red")


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Inf" if value > 0 else "-Inf")
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.3e}"
