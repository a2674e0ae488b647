"""Distributed runs: a rank whose own gradients stand out from the others' before the all-reduce."""

from __future__ import annotations

import math
from typing import Any

from gradscope.report import Anomaly, RankStep, Report
from gradscope.rules.common import median


def rank_divergence(report: Report, check: Any) -> list[Anomaly]:
    """The first step where one rank's own gradient norm is more than ``check.factor`` times the
    median of the other ranks' (or below it by as much). Each rank averages its own slice of the
    batch, so its gradient differs from the others' by sampling noise, not by orders of magnitude.
    Non-finite gradients are the non-finite rules' (which name the rank)."""
    for step in report.steps:
        ranks = [r for r in step.ranks if r.grad_norm is not None and math.isfinite(r.grad_norm)]
        if len(ranks) < 2 or len(ranks) < len(step.ranks):
            continue
        apart = [(_distance(r, ranks), r.grad_norm or 0.0, r) for r in ranks]
        # Of two ranks both are equally far from "the other"; the larger one dominates. The distances are
        # rounded so that |log(a/b)| and |log(b/a)|, equal but for the last bit, compare as equal.
        distance, _, rank = max(apart, key=lambda a: (round(a[0], 9), a[1]))
        if distance > math.log(check.factor):
            others = _median_of_others(rank, ranks)
            return [_finding(step.step, rank, others, ranks, check.factor)]
    return []


def _median_of_others(rank: RankStep, ranks: list[RankStep]) -> float:
    return median([r.grad_norm or 0.0 for r in ranks if r.rank != rank.rank])


def _distance(rank: RankStep, ranks: list[RankStep]) -> float:
    """|log| of the rank's norm over the median of the others' (inf when exactly one of them is 0)."""
    norm, others = rank.grad_norm or 0.0, _median_of_others(rank, ranks)
    if norm == 0 or others == 0:
        return 0.0 if norm == others else math.inf
    return abs(math.log(norm / others))


def _finding(step: int, rank: RankStep, others: float, ranks: list[RankStep], factor: float) -> Anomaly:
    norms = {r.rank: r.grad_norm for r in ranks}
    larger = (rank.grad_norm or 0.0) > others
    effect = "dominates the all-reduced gradient every rank applies" if larger else "adds almost nothing to it"
    return Anomaly(
        kind="rank_divergence",
        severity="warning",
        step=step,
        rank=rank.rank,
        message=(
            f"rank {rank.rank}'s own gradient norm before the all-reduce is {rank.grad_norm:.4g} at step {step}, "
            f"against {others:.4g} on the other ranks (median; more than {factor:g}x apart): its slice of the "
            f"batch {effect}. Check that rank's data (a corrupted or mis-scaled shard) and any rank-dependent "
            f"code (seeds, masks, a loss scaled by rank)."
        ),
        evidence={"rank_grad_norms": norms, "rank_losses": {r.rank: r.loss for r in ranks}},
    )
