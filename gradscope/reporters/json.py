"""The JSON report, written with ``json.dumps`` (strict JSON: non-finite floats are strings)."""

from __future__ import annotations

import json
from pathlib import Path

from gradscope.errors import GradscopeError
from gradscope.report import SCHEMA_VERSION, Report, StepRecord
from gradscope.report.report_check import ReportError
from gradscope.report.report_json import report_text
from gradscope.utils import outfiles


class JsonReporter:
    """Writes the report to ``path`` (``-``: stdout).

    Args:
        path: the file to write; its folder is created if needed.
    """

    def __init__(self, path: str, option: str = "--json") -> None:
        self.path, self.option = path, option

    def on_step(self, step: StepRecord) -> None:
        return None  # writes the whole report at the end

    def write(self, report: Report) -> None:
        outfiles.write_text(self.option, self.path, report_text(report))  # atomic: never a half-written report

    def close(self) -> None:
        return None


def load_report(path: str | Path) -> Report:
    """Read a report written by ``JsonReporter``.

    Raises:
        GradscopeError: the file is missing, not JSON, or not a gradscope report of a known schema.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise GradscopeError(f"cannot read report {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise GradscopeError(f"{path} is not a gradscope report: not UTF-8 text (byte {exc.start})") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise GradscopeError(f"{path} is not JSON (truncated?): {exc}") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise GradscopeError(
            f"{path}: expected a gradscope report with schema_version {SCHEMA_VERSION}, got {version!r}"
        )
    try:
        return Report.from_dict(data)
    except ReportError as exc:
        raise GradscopeError(f"{path}: not a gradscope report: {exc}") from None
