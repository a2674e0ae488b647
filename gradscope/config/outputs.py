"""Where a run's report goes: the outputs a command line, a config or ``gradscope.watch`` asks for.

Plain settings: ``gradscope.reporters.build_reporters`` makes the reporters they name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from gradscope.config.checks import Checks


@dataclass(frozen=True)
class Outputs:
    """Where a run's report goes; every field left at its default writes nothing.

    Attributes:
        terminal: the stream the human-readable report is printed to.
        show_all: every parameter row in the terminal table.
        plot: the gradient-flow picture's PNG path.
        json: the JSON report's path (``-``: stdout).
        junit: JUnit XML's path; ``fail_on`` says which findings fail its test cases.
        logdir: a TensorBoard run's folder; ``config_text`` is logged there as text.
        github: GitHub Actions annotations and step summary; ``config_source`` is where
            findings without a source line are annotated.
        baseline: a second JSON copy of the report (``--update-baseline``).
        progress: the steps of the run, for a progress line on stderr (None: no line).
        compared: the run was compared with a baseline (JUnit's ``baseline_drift`` ran).
        jsonl: a JSON Lines file that gets every step as it is measured.
        csv: a CSV table of every kept step's per-parameter statistics.
        checks: the config's thresholds, for JUnit's checks that need a number of steps.
        speak: say each kind of warning or error as it first appears, and a summary at the end
            (``reporters.logs``), through ``say(level, text)`` (None: the ``gradscope`` logger).
    """

    terminal: IO[str] | None = None
    show_all: bool = False
    plot: str | None = None
    json: str | None = None
    junit: str | None = None
    fail_on: str = "error"
    logdir: str | None = None
    config_text: str | None = None
    github: bool = False
    config_source: str | None = None
    baseline: str | None = None
    progress: int | None = None
    compared: bool = False
    jsonl: str | None = None
    csv: str | None = None
    checks: Checks | None = None  # the config's thresholds (JUnit skips the checks a run is too short for)
    speak: bool = False
    say: Callable[[int, str], None] | None = None
