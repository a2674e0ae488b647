"""The JSON report, written with ``json.dumps`` (strict JSON: non-finite floats are strings)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gradscope.report import Report


class JsonReporter:
    """Writes the report to ``path`` (``-``: stdout).

    Args:
        path: the file to write; its folder is created if needed.
    """

    def __init__(self, path: str) -> None:
        self.path = path

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
