"""Per-parameter statistics of every step kept in full, as one CSV table (``--csv PATH``).

One row per (step, parameter) in long form, which a spreadsheet filters and ``pandas.read_csv``
pivots (``df.pivot(index="step", columns="parameter", values="grad_norm")``). Each row also holds its
step's loss, total gradient norm and clip coefficient. An empty cell is a value that does not exist
(no gradient arrived, no clipping); non-finite numbers are written as ``nan``, ``inf`` and ``-inf``,
which both read back as floats.
"""

from __future__ import annotations

import csv
import dataclasses
import io

from gradscope.report import GradStats, Report, StepRecord
from gradscope.utils import outfiles

STEP_COLUMNS = ("step", "loss", "grad_norm_total", "clip_coefficient")
PARAM_COLUMNS = tuple(f.name for f in dataclasses.fields(GradStats))


class CsvReporter:
    """Writes the table to ``path`` (``-``: stdout) when the run ends, in one atomic write.

    Args:
        path: the file to write; its folder is created if needed.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_step(self, step: StepRecord) -> None:
        return None  # the whole table is written at the end

    def write(self, report: Report) -> None:
        out = io.StringIO()
        table = csv.writer(out, lineterminator="\n")
        table.writerow((*STEP_COLUMNS, "parameter", *PARAM_COLUMNS))
        for step in report.steps:
            head = [_cell(getattr(step, column)) for column in STEP_COLUMNS]
            for name, stats in step.parameters.items():
                table.writerow((*head, name, *(_cell(getattr(stats, column)) for column in PARAM_COLUMNS)))
        outfiles.write_text("--csv", self.path, out.getvalue())

    def close(self) -> None:
        return None


def _cell(value: float | int | None) -> str:
    return "" if value is None else repr(value)
