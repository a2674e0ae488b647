"""Every measured step as one JSON object a line, written as it is measured.

The in-memory report of a long run keeps only some steps in full (``history.Retention``); this
stream keeps all of them, in the form of the JSON report's ``steps[i]`` (strict JSON: non-finite
floats are strings), so nothing measured is lost and a run that dies leaves its steps readable.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO

from gradscope.report import Report, StepRecord
from gradscope.report.report_json import step_dict
from gradscope.utils import outfiles


class JsonlReporter:
    """Appends each step to ``path`` as it is measured (the file is started afresh).

    Args:
        path: the file to write (``-``: stdout); its folder is created if needed.
    """

    def __init__(self, path: str) -> None:
        self._own = not outfiles.is_stdout(path)  # ``-``: stdout, left open
        fd = outfiles.descriptor(path)
        if fd is not None and self._own:  # /dev/stderr, /dev/fd/N: through the descriptor, not the path
            self._file: IO[str] | None = os.fdopen(os.dup(fd), "w")
        elif self._own:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._file = target.open("w")
        else:
            self._file = sys.stdout

    def on_step(self, step: StepRecord) -> None:
        if self._file is not None:
            self._file.write(json.dumps(step_dict(step), allow_nan=False) + "\n")
            self._file.flush()  # a run that dies leaves every step before it readable

    def write(self, report: Report) -> None:
        return None  # every step was written as it came

    def close(self) -> None:
        if self._file is not None and self._own:
            self._file.close()
        self._file = None
