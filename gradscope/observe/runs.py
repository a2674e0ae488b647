"""What every run states, whoever drives it (``Inspection`` from a config, ``Watch`` in a user's
loop): its ``RunInfo``, and its report, judged by the rules once and kept until the run changes."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from gradscope import rules
from gradscope.config import Checks
from gradscope.report import ParamInfo, Report, RunInfo
from gradscope.utils.wrappers import model_name
from gradscope.version import __version__


def run_info(model: nn.Module, infos: list[ParamInfo], steps: int, ranks: Any = None, **facts: Any) -> RunInfo:
    """The run's facts: those of the model, its parameters and ranks, and the driver's ``facts``.

    Args:
        model: the model (wrapped or not: it is named by the user's class).
        infos: its parameters.
        steps: the steps completed.
        ranks: a distributed run's ``distributed.Ranks``.
        facts: the other ``RunInfo`` fields (device, precision, steps_requested, status, ...).
    """
    return RunInfo(
        model=model_name(model),
        steps_completed=steps,
        parameters_total=sum(i.numel for i in infos),
        parameters_trainable=sum(i.numel for i in infos if i.trainable),
        torch_version=torch.__version__,
        gradscope_version=__version__,
        distributed=ranks.describe() if ranks is not None else None,
        **facts,
    )


def judged(report: Report, checks: Checks, baseline: Report | None = None) -> Report:
    """The report with the anomalies the rules find in it (and those ``checks.ignore`` accepts)."""
    anomalies, ignored = rules.diagnose(report, checks, baseline)
    return replace(report, anomalies=anomalies, ignored=ignored)


class ReportCache:
    """A run's judged report, made again only when ``key`` (what the run has done so far) changes:
    a CLI run asks for it while streaming, at the end and for its exit code."""

    def __init__(self) -> None:
        self._key: Hashable = object()
        self._report: Report | None = None

    def get(self, key: Hashable, make: Callable[[], Report]) -> Report:
        if self._report is None or key != self._key:
            self._report, self._key = make(), key
        return self._report


def learning_rate(optimizer: torch.optim.Optimizer | None) -> float | None:
    """The first parameter group's learning rate, when it is a plain number (not a scheduler's tensor)."""
    groups = optimizer.param_groups if optimizer is not None else []
    lr = groups[0].get("lr") if groups else None
    return float(lr) if isinstance(lr, (int, float)) else None


def nonfinite_parameters(model: nn.Module) -> tuple[str, ...]:
    """The parameters holding a NaN or Inf now (one check per parameter: only after a run raised)."""
    with torch.no_grad():
        return tuple(name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all()))
