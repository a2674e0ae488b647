"""The public functions that put the parts together: a ``Watch`` with the reporters its outputs name.

``gradscope.watch`` is this module's ``watch``; ``gradscope.inspect`` runs a config (``runner.inspection``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradscope.config import Checks
from gradscope.config.outputs import Outputs
from gradscope.observe.history import Retention
from gradscope.observe.watch import Watch
from gradscope.report import StepRecord
from gradscope.reporters import build_reporters
from gradscope.runner.inspection import Inspection, inspect

__all__ = ["Inspection", "Watch", "inspect", "watch"]


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    logdir: str | None = None,
    raise_on: str | None = None,
    checks: Checks | dict[str, Any] | None = None,
    activations: bool = True,
    locate: bool = True,
    histograms_every: int = 10,
    plot: str | None = None,
    every: int = 1,
    on_step: Callable[[StepRecord], None] | None = None,
    probes: tuple[str, ...] | list[str] = (),
    retention: Retention | dict[str, int] | None = None,
    jsonl: str | None = None,
    json: str | None = None,
    memory: bool = False,
    quiet: bool = False,
) -> Watch:
    """Watch ``model``'s gradients in your own training loop.

    Args:
        model: the model being trained; left as it was when the block exits.
        optimizer: steps are recorded at each ``optimizer.step()`` (through a step pre-hook), with
            the loss each ``backward()`` was called on. Without one, call ``scope.step()`` after
            ``backward()`` and any clipping (the rule of ``Watch.step``).
        scaler: your ``torch.amp.GradScaler``, so gradients are reported unscaled and steps it
            skips are recorded as skipped.
        logdir: write a TensorBoard run there, step by step.
        raise_on: ``"error"`` (or ``"warning"``, ``"info"``): raise ``GradientAnomaly`` at the first
            step with such a finding, before the optimizer updates the weights.
        checks: thresholds and accepted findings, as the config's ``checks:`` section.
        activations: dead/saturated unit statistics (a TorchFunctionMode over the block).
        locate: keep the model's last forward call to replay a step that shows a NaN/Inf.
        histograms_every: gradient histograms for TensorBoard every N steps.
        plot: save the gradient-flow picture there when the block exits (needs matplotlib).
        every: measure every N-th step only (the others cost nothing); 1 measures every step.
        on_step: called with each step's ``StepRecord`` as it is measured (to log it your own way).
        probes: optional probes by name (``gradscope.probes.OPTIONAL``), e.g. ``("update_ratio",)``;
            their values are in ``StepRecord.probes``.
        retention: how many steps the report keeps in full (``gradscope.Retention`` or its fields as a
            dict): the first steps, each step with a finding and the steps before it, a sparse sample;
            every step's loss and norms, and the totals the rules need, are kept whatever it says.
        jsonl: stream every measured step's full record there, one JSON object a line.
        json: write the JSON report there when the block exits (``gradscope show`` reads it).
        memory: the memory ledger of the first measured step: what autograd saves for backward per
            module, the parameters, gradients and optimizer state, and checkpointing advice
            (``report.memory``; the same as ``probes=("memory",)``).
        quiet: say nothing; otherwise the ``gradscope`` logger gets each kind of warning or error
            at the step it first appears, and a one-line summary when the block exits (rank 0).

    Returns:
        A ``Watch``: use as ``with gradscope.watch(...) as scope``; ``scope.report`` afterwards.
    """
    if isinstance(checks, dict):
        checks = Checks.model_validate(checks)
    if isinstance(retention, dict):
        retention = Retention(**retention)
    return Watch(
        model,
        optimizer,
        scaler,
        outputs=Outputs(logdir=logdir, plot=plot, jsonl=jsonl, json=json, speak=not quiet),
        reporters=build_reporters,
        raise_on=raise_on,
        checks=checks,
        activations=activations,
        locate=locate,
        histograms_every=histograms_every,
        on_step=on_step,
        every=every,
        probes=probes,
        retention=retention,
        memory=memory,
    )
