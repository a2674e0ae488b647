"""The last lines of a run: the files it wrote and a one-line verdict with the exit code.

On a terminal the findings panel and a long table scroll the finding off screen; these lines
are printed after everything else, so the outcome is what a person sees last.
"""

from __future__ import annotations

import os
from pathlib import Path

from gradscope.report import Report
from gradscope.reporters.ci import source_location
from gradscope.reporters.findings import Group, group

_ORDER = ("error", "warning", "info")


def verdict(report: Report, code: int, fail_on: str | None = None) -> str:
    """``1 error, 2 warnings: nonfinite_forward at blocks.2 (faults.py:23); exit 1``.

    Args:
        report: the finished (or partial) report.
        code: the exit code the command returns.
        fail_on: the ``--fail-on`` severity, said when findings are below it.
    """
    groups = group(report.anomalies)
    counts = _counts(groups)
    run = report.run
    parts = []
    cause = next((a for a in report.anomalies if "consequence" in a.evidence), None)
    if run.status != "completed" and cause is None:
        parts.append(f"run {run.status} after {run.steps_completed} of {run.steps_requested} steps")
    if groups:
        below = f" (below --fail-on {fail_on})" if fail_on and code == 0 and run.status == "completed" else ""
        parts.append(f"{counts}{below}: {headline(groups[0])}")
    elif run.status == "completed":
        parts.append("no anomalies found")
    if cause is not None:  # the run raised on what an earlier finding wrote into the weights
        step = cause.evidence["consequence"]["step"]
        parts.append(
            f"then step {step} raised, its consequence ({run.steps_completed} of {run.steps_requested} steps ran)"
        )
    return "; ".join(parts) + f"; exit {code}"


def headline(g: Group) -> str:
    """A group in a few words: kind, place and the user's source line."""
    places = g.places
    if len(places) > 1:
        where = f" in {len(places)} layers"
    elif places:
        where = f" at {places[0]}"
    else:
        where = ""
    file, line = source_location(g.first)
    at = f" ({os.path.basename(file)}:{line})" if file and line else ""
    return f"{g.kind}{where}{at}" + (
        f", and {len(g.anomalies) - 1} more like it" if len(places) <= 1 < len(g.anomalies) else ""
    )


def written(paths: list[str | None]) -> str:
    """``wrote report.json, junit.xml``, for the outputs that exist; empty when none does."""
    found = [p for p in paths if p and p != "-" and Path(p).exists()]
    return f"wrote {', '.join(found)}" if found else ""


def _counts(groups: list[Group]) -> str:
    tally = {s: sum(1 for g in groups if g.severity == s) for s in _ORDER}
    words = []
    for severity in _ORDER:
        n = tally[severity]
        if n:
            words.append(f"{n} {severity}{'' if n == 1 else 's'}")
    return ", ".join(words)
