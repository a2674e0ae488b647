"""The terminal report's per-step table: which steps it shows, and what stands between them.

A short run shows every step. A long one shows the first and last few steps, each flagged step and
each step where a finding starts; flagged steps in a row that are alike (a NaN that persists) are
one row. Between two rows, one dim row names the steps left out and why: recorded in full but not
shown (``--all`` shows them), or not recorded in full (a long run keeps only some steps in full;
``report.retained`` says which, and holds every step's loss and norm).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Group as Stack
from rich.table import Table
from rich.text import Text

from gradscope.report import Report, Retained, StepRecord
from gradscope.reporters.cells import num

STEP_HEAD = 5  # of a long run, the first steps ...
STEP_TAIL = 5  # ... and the last are shown, plus every flagged step
ALIKE = 3  # flagged steps in a row that are alike, from this many on, are one row


@dataclass(frozen=True)
class Gap:
    """Steps ``first``..``last`` left out between two rows: ``hidden`` recorded in full but not
    shown, ``unrecorded`` not recorded in full."""

    first: int
    last: int
    hidden: int
    unrecorded: int


@dataclass(frozen=True)
class Alike:
    """Flagged steps in a row, each flagged in the same way (``what``)."""

    records: tuple[StepRecord, ...]
    what: str


Row = StepRecord | Alike | Gap


def steps_table(report: Report, show_all: bool) -> Stack:
    """The table under its title (the title wraps at the screen's width, not the table's)."""
    steps = report.steps
    clip = any(s.clip_coefficient is not None for s in steps)
    amp = any(s.loss_scale is not None for s in steps)
    rows = visible(report, show_all)
    table = Table(box=None, pad_edge=False)
    columns = ["step", "loss", "grad norm"]
    columns += ["clipped norm", "clip coef"] if clip else []
    columns += ["loss scale", "update"] if amp else []
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    notes = any(isinstance(r, (Gap, Alike)) for r in rows)
    if notes:
        table.add_column("", justify="left", no_wrap=True)
    for row in rows:
        if isinstance(row, Gap):
            table.add_row(Text(_span(row.first, row.last), style="dim"), *[""] * (len(columns) - 1), _gap_note(row))
            continue
        record = row.records[0] if isinstance(row, Alike) else row
        cells = _cells(record, clip, amp)
        if isinstance(row, Alike):
            first, last = row.records[0].step, row.records[-1].step
            cells[0] = Text(_span(first, last))
            cells.append(Text(f"{len(row.records)} steps alike: {row.what}", style="dim"))
        elif notes:
            cells.append("")
        table.add_row(*cells)
    return Stack(Text(title(report, rows)), table)


def visible(report: Report, show_all: bool) -> list[Row]:
    """The rows to print, in step order: records, runs of alike flagged records, and gaps."""
    steps = report.steps
    keep = set(range(len(steps)))
    if not show_all and len(steps) > STEP_HEAD + STEP_TAIL + 5:
        starts = {a.step for a in report.anomalies}
        keep = {i for i in keep if i < STEP_HEAD or i >= len(steps) - STEP_TAIL}
        keep |= {i for i, s in enumerate(steps) if s.step in starts or flag(s)}
    series = report.retained.series.step if report.retained is not None else None
    rows: list[Row] = []
    shown = sorted(keep)
    at = 0
    while at < len(shown):
        end = _alike_end(steps, shown, at, series)
        gap = _gap(steps, shown[at - 1] if at else -1, shown[at], series)
        rows += [gap] if gap is not None else []
        if end - at >= ALIKE:
            rows.append(Alike(tuple(steps[i] for i in shown[at:end]), flag(steps[shown[at]])))
        else:
            rows += [steps[i] for i in shown[at:end]]
        at = end
    gap = _gap(steps, shown[-1], len(steps), series) if shown else None
    return rows + ([gap] if gap is not None else [])


def flag(s: StepRecord) -> str:
    """How a step is flagged by itself ("" when it is not): non-finite numbers, a skip, an error."""
    if s.backward_error is not None:
        return "backward raised"
    parts = [f"loss {num(s.loss)}" if s.loss is not None and not math.isfinite(s.loss) else ""]
    parts.append(f"grad norm {num(s.grad_norm_total)}" if not math.isfinite(s.grad_norm_total) else "")
    parts.append("update skipped" if s.skipped else "")
    return ", ".join(p for p in parts if p)


def title(report: Report, rows: list[Row]) -> str:
    """What the table holds: of a long run, which steps were recorded in full; what is left out."""
    recorded = len(report.steps)
    shown = sum(len(r.records) if isinstance(r, Alike) else 1 for r in rows if not isinstance(r, Gap))
    retained = report.retained
    total = len(retained.series.step) if retained is not None else recorded
    if total <= recorded:
        return "per step" + (f" ({shown} of {recorded} shown: first, last and flagged)" if shown < recorded else "")
    text = f"per step: {recorded} of {total} steps recorded in full ({_which(retained)})"
    if shown < recorded:
        text += f"; {shown} of them shown (first, last and flagged; --all shows every one)"
    return text


def _which(retained: Retained) -> str:
    """The policy that chose the recorded steps, said with the steps it chose."""
    series, kept = retained.series.step, set(retained.kept)
    head = kept & set(series[: retained.policy.get("first", 0)])
    last = {series[-1]} & kept
    stride = retained.stride
    sampled = {s for s in kept - head - last if stride and s % stride == 0}
    others = kept - head - last - sampled
    parts = [f"the first {len(head)}" if head else ""]
    parts.append(f"{len(sampled)} sampled, one every {stride} steps" if sampled else "")
    parts.append(f"{len(others)} {'around findings' if stride else 'others'}" if others else "")
    parts.append("the last" if last else "")
    return ", ".join(p for p in parts if p)


def _alike_end(steps: Sequence[StepRecord], shown: list[int], at: int, series: Sequence[int] | None) -> int:
    """The end (in ``shown``) of the run of alike flagged steps that starts at ``shown[at]``."""
    what = flag(steps[shown[at]])
    end = at + 1
    if not what:
        return end
    while end < len(shown) and shown[end] == shown[end - 1] + 1 and flag(steps[shown[end]]) == what:
        if _between(series, steps[shown[end - 1]].step, steps[shown[end]].step):
            break  # steps not recorded lie between: not known to be alike
        end += 1
    return end


def _gap(steps: Sequence[StepRecord], before: int, after: int, series: Sequence[int] | None) -> Gap | None:
    """The steps between ``steps[before]`` and ``steps[after]`` (indices; -1 and ``len``: the ends)."""
    low = steps[before].step if before >= 0 else None
    high = steps[after].step if after < len(steps) else None
    hidden = after - before - 1  # recorded in full, not shown
    missing = _between(series, low, high)  # every step of the run between them (none known without a series)
    if missing:
        return Gap(missing[0], missing[-1], hidden, max(len(missing) - hidden, 0))
    return Gap(steps[before + 1].step, steps[after - 1].step, hidden, 0) if hidden > 0 else None


def _between(series: Sequence[int] | None, low: int | None, high: int | None) -> Sequence[int]:
    """The run's steps strictly between ``low`` and ``high`` (None: the run's start or end)."""
    if series is None:
        return []
    start = bisect.bisect_right(series, low) if low is not None else 0
    end = bisect.bisect_left(series, high) if high is not None else len(series)
    return series[start:end]


def _cells(s: StepRecord, clip: bool, amp: bool) -> list[Text | str]:
    # A backward that raised left no gradient: there is no norm to show, not a NaN one.
    norm = Text("no grad", style="yellow") if s.backward_error else Text(num(s.grad_norm_total))
    row: list[Text | str] = [str(s.step), num(s.loss), norm]
    if clip:
        row += [num(s.grad_norm_total_clipped), num(s.clip_coefficient)]
    if amp:
        row += [num(s.loss_scale), "skipped" if s.skipped else "applied"]
    return row


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def _gap_note(gap: Gap) -> Text:
    count = gap.hidden + gap.unrecorded
    steps = f"{count} step{'s' if count > 1 else ''}"
    if not gap.unrecorded:
        return Text(f"{steps} not shown", style="dim")
    if not gap.hidden:
        return Text(f"{steps} not recorded in full", style="dim")
    return Text(f"{steps}: {gap.hidden} not shown, {gap.unrecorded} not recorded in full", style="dim")
