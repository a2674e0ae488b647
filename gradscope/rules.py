"""Anomaly rules: pure functions from a report's statistics to findings.

Each rule takes the ``Report`` (no anomalies yet) and returns the anomalies
it finds; ``RULES`` lists them in the order they run.
"""

from __future__ import annotations

from collections.abc import Callable

from gradscope.report import Anomaly, Report

Rule = Callable[[Report], list[Anomaly]]

RULES: tuple[Rule, ...] = ()


def diagnose(report: Report) -> tuple[Anomaly, ...]:
    """Every rule's findings, most severe first."""
    found = [anomaly for rule in RULES for anomaly in rule(report)]
    order = {"error": 0, "warning": 1, "info": 2}
    return tuple(sorted(found, key=lambda a: (order[a.severity], a.step if a.step is not None else -1)))
