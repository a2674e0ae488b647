"""Helpers the rules share: which steps to judge, and the model's layers in forward order."""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from gradscope.report import ParamInfo, Report, RunTotals, StepRecord, tables
from gradscope.report.stats import clean, fully_dead, median  # noqa: F401 (the rules import them from here too)

EMBEDDINGS = ("Embedding", "EmbeddingBag")
T = TypeVar("T")


def totals(report: Report) -> RunTotals | None:
    """Running totals over every step, when the report keeps only some steps in full."""
    return report.retained.totals if report.retained is not None else None


def step_count(report: Report) -> int:
    """Steps the run measured, kept in full or not."""
    return report.retained.totals.steps if report.retained is not None else len(report.steps)


def per_report(fn: Callable[[Report], T]) -> Callable[[Report], T]:
    """``fn(report)`` computed once for the report the rules are judging (the last one it saw, held
    weakly): the rules of one judgement share it. Callers treat the result as read-only."""
    last: list[Any] = [None, None]

    @functools.wraps(fn)
    def cached(report: Report) -> T:
        if last[0] is not None and last[0]() is report:
            return last[1]
        result = fn(report)
        last[0], last[1] = weakref.ref(report), result
        return result

    return cached


@per_report
def clean_steps(report: Report) -> list[StepRecord]:
    return [s for s in report.steps if clean(s)]


def nonfinite_step(step: StepRecord) -> bool:
    if step.backward_error is not None:
        return False
    grads_bad = bool(tables.nonfinite(step.parameters))  # a ParamTable knows them without a scan
    if step.skipped and step.origin is None and not loss_is_bad(step):
        return False  # a grad-scaler overflow: loss_scale_overflow reports it (a NaN loss is a NaN's spread)
    return loss_is_bad(step) or grads_bad


def loss_is_bad(step: StepRecord) -> bool:
    """The loss is known and not finite."""
    return step.loss is not None and not math.isfinite(step.loss)


def weights_in_order(report: Report) -> list[ParamInfo]:
    """Weight matrices and kernels (not biases, norms or embeddings), from input to output."""
    weights = [p for p in report.parameters if p.trainable and len(p.shape) >= 2 and p.module_type not in EMBEDDINGS]
    order = {name: i for i, name in enumerate(report.called_modules or ())}
    if order:
        weights = [p for p in weights if p.module in order]
        weights.sort(key=lambda p: order[p.module])
    return weights


def in_forward_order(report: Report) -> list[ParamInfo]:
    order = {name: i for i, name in enumerate(report.called_modules or ())}
    if not order:
        return list(report.parameters)
    return sorted(report.parameters, key=lambda p: forward_position(order, p.module))


def forward_position(order: dict[str, int], module: str) -> int:
    """Where a module's parameters go in forward order: its own call, or for a module never called
    as one (``nn.MultiheadAttention``'s ``out_proj``, whose weight the parent uses directly) its
    nearest called parent's; modules with no called parent go last."""
    if module in order:
        return order[module]
    name = module.rpartition(".")[0]
    while name:  # the model itself is every module's parent: not a place to put one
        if name in order:
            return order[name]
        name = name.rpartition(".")[0]
    return len(order)


def by_module(params: list[ParamInfo]) -> dict[str, list[ParamInfo]]:
    groups: dict[str, list[ParamInfo]] = {}
    for p in params:
        groups.setdefault(p.module, []).append(p)
    return groups
