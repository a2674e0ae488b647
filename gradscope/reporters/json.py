"""The JSON report, written with ``json.dumps`` (strict JSON: non-finite floats are strings)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gradscope.errors import GradscopeError
from gradscope.report import SCHEMA_VERSION, Report, StepRecord


class JsonReporter:
    """Writes the report to ``path`` (``-``: stdout).

    Args:
        path: the file to write; its folder is created if needed.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_step(self, step: StepRecord) -> None:
        return None  # writes the whole report at the end

    def write(self, report: Report) -> None:
        text = json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n"
        if self.path == "-":
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(target)  # never leave a half-written report behind

    def close(self) -> None:
        return None


def load_report(path: str | Path) -> Report:
    """Read a report written by ``JsonReporter``.

    Raises:
        GradscopeError: the file is missing, not JSON, or not a gradscope report of a known schema.
    """
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise GradscopeError(f"cannot read report {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise GradscopeError(f"{path} is not JSON: {exc}") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise GradscopeError(
            f"{path}: expected a gradscope report with schema_version {SCHEMA_VERSION}, got {version!r}"
        )
    try:
        return Report.from_dict(data)
    except (KeyError, TypeError) as exc:
        raise GradscopeError(f"{path}: not a complete gradscope report ({type(exc).__name__}: {exc})") from None
