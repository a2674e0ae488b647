"""Anomaly rules: pure functions from a report's statistics to findings.

Each rule takes the report (no anomalies yet) and its thresholds from the
config's ``checks:`` and returns what it finds; ``RULES`` lists them, one
module per family. ``diagnose`` applies severity overrides and ``ignore``
entries.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from gradscope.config import Checks
from gradscope.report import Anomaly, Report
from gradscope.rules.activations import dead_relu, saturated_activation
from gradscope.rules.baseline import baseline_drift
from gradscope.rules.broken import backward_error, nonfinite, wrong_gradient
from gradscope.rules.consequences import raised_after
from gradscope.rules.flow import exploding_gradient, stale_gradient, vanishing_gradient
from gradscope.rules.loop import eval_mode, no_update, not_in_optimizer, step_not_called
from gradscope.rules.memory import memory_budget, memory_growth
from gradscope.rules.precision import gradient_clipping, gradient_underflow, loss_scale_overflow
from gradscope.rules.ranks import rank_divergence
from gradscope.rules.spikes import early_scale, gradient_spike, loss_spike, spike_against, spike_finding, with_causes
from gradscope.rules.unused import expert_routing, unused_parameter, zero_gradient
from gradscope.rules.updates import update_ratio

Rule = Callable[[Report, Any], list[Anomaly]]
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}

# (the kind whose thresholds the rule reads, the rule); the nonfinite rule reports three kinds.
RULES: tuple[tuple[str, Rule], ...] = (
    ("nonfinite_forward", nonfinite),
    ("backward_error", backward_error),
    ("vanishing_gradient", vanishing_gradient),
    ("exploding_gradient", exploding_gradient),
    ("dead_relu", dead_relu),
    ("saturated_activation", saturated_activation),
    ("unused_parameter", unused_parameter),
    ("zero_gradient", zero_gradient),
    ("expert_routing", expert_routing),
    ("gradient_clipping", gradient_clipping),
    ("loss_scale_overflow", loss_scale_overflow),
    ("gradient_underflow", gradient_underflow),
    ("wrong_gradient", wrong_gradient),
    ("stale_gradient", stale_gradient),
    ("rank_divergence", rank_divergence),
    ("loss_spike", loss_spike),
    ("gradient_spike", gradient_spike),
    ("update_ratio", update_ratio),
    ("memory_budget", memory_budget),
    ("not_in_optimizer", not_in_optimizer),
    ("no_update", no_update),
    ("step_not_called", step_not_called),
    ("eval_mode", eval_mode),
)

# The rules of the loop around the gradients (``run.loop``): a watch also judges them while it runs.
LOOP_KINDS = ("not_in_optimizer", "no_update", "step_not_called", "eval_mode")


# Kinds a single step shows by itself; the others look across steps (or need a window of them).
STEP_KINDS = (
    "nonfinite_forward",
    "backward_error",
    "vanishing_gradient",
    "exploding_gradient",
    "dead_relu",
    "saturated_activation",
    "gradient_underflow",
    "stale_gradient",
)

__all__ = [
    "LOOP_KINDS",
    "RULES",
    "STEP_KINDS",
    "diagnose",
    "early_scale",
    "findings",
    "loop_findings",
    "settle",
    "spike_against",
    "spike_finding",
    "step_findings",
]


def step_findings(report: Report, checks: Checks) -> list[Anomaly]:
    """The findings of the rules that judge each step by itself (``STEP_KINDS``), severity ``off`` left out."""
    found = [a for kind, rule in RULES if kind in STEP_KINDS for a in rule(report, checks.rule(kind))]
    return [a for a in found if checks.rule(a.kind).severity != "off"]


def loop_findings(report: Report, checks: Checks) -> list[Anomaly]:
    """The findings of the loop rules (``LOOP_KINDS``) as the rules make them (before ``settle``)."""
    return [a for kind, rule in RULES if kind in LOOP_KINDS for a in rule(report, checks.rule(kind))]


def diagnose(
    report: Report, checks: Checks | None = None, baseline: Report | None = None
) -> tuple[tuple[Anomaly, ...], tuple[Anomaly, ...]]:
    """Every rule's findings, most severe first, and those the config's ``ignore`` accepts.

    Args:
        report: the report to judge (its anomalies are ignored).
        checks: thresholds, severities and accepted findings.
        baseline: a saved report of the same config to compare gradient norms with.

    Returns:
        ``(anomalies, ignored)``.
    """
    checks = checks or Checks()
    return settle(findings(report, checks, baseline), checks)


def findings(report: Report, checks: Checks, baseline: Report | None = None) -> list[Anomaly]:
    """Every rule's findings as the rules make them (before ``settle``)."""
    found = [anomaly for kind, rule in RULES for anomaly in rule(report, checks.rule(kind))]
    if baseline is not None:
        found.extend(baseline_drift(report, baseline, checks.baseline_drift))
        found.extend(memory_growth(report, baseline, checks.memory_growth))
    return raised_after(report, found)


def settle(found: list[Anomaly], checks: Checks) -> tuple[tuple[Anomaly, ...], tuple[Anomaly, ...]]:
    """Findings with the config's severities (``off`` dropped), causes linked, most severe first,
    and apart from them those its ``ignore`` accepts."""
    found = [_with_severity(a, checks) for a in found if checks.rule(a.kind).severity != "off"]
    found = with_causes(found)
    kept = [a for a in found if not _ignored(a, checks)]
    ignored = [a for a in found if _ignored(a, checks)]
    return tuple(sorted(kept, key=_rank)), tuple(ignored)


def _with_severity(anomaly: Anomaly, checks: Checks) -> Anomaly:
    severity = checks.rule(anomaly.kind).severity
    return replace(anomaly, severity=severity) if severity else anomaly


def _rank(a: Anomaly) -> tuple[int, int]:
    return SEVERITY_ORDER[a.severity], a.step if a.step is not None else -1


def _ignored(anomaly: Anomaly, checks: Checks) -> bool:
    return any(
        entry.kind == anomaly.kind
        and fnmatch.fnmatchcase(anomaly.module or "", entry.module)
        and fnmatch.fnmatchcase(anomaly.parameter or "", entry.parameter)
        for entry in checks.ignore
    )
