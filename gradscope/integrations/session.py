"""What both trainer callbacks share: their options, and the watch they open when training
starts and close when it ends (or raises), writing the report where asked."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradscope.config import Checks
from gradscope.observe.watch import Watch
from gradscope.probes import OPTIONAL
from gradscope.report import SEVERITIES, Report, StepRecord
from gradscope.reporters import Outputs, build_reporters


@dataclass(frozen=True)
class Options:
    """The ``gradscope.watch`` arguments a trainer callback takes (see ``gradscope.watch``), and
    ``json``: the path the report is written to when training ends."""

    logdir: str | None = None
    raise_on: str | None = None
    every: int = 1
    checks: Checks | None = None
    json: str | None = None
    activations: bool = True
    locate: bool = True
    histograms_every: int = 10
    probes: tuple[str, ...] = ()
    quiet: bool = False  # say nothing through the trainer's warnings and logs

    @classmethod
    def of(cls, checks: Checks | dict[str, Any] | None = None, **kwargs: Any) -> Options:
        """Checked now, when the callback is made, not when training starts."""
        raise_on, every = kwargs.get("raise_on"), kwargs.get("every", 1)
        if raise_on is not None and raise_on not in SEVERITIES:
            raise ValueError(f"raise_on must be one of {', '.join(SEVERITIES)} or None, got {raise_on!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}")
        unknown = [name for name in kwargs.get("probes", ()) if name not in OPTIONAL]
        if unknown:
            raise ValueError(f"unknown probe {unknown[0]!r}: the optional probes are {', '.join(sorted(OPTIONAL))}")
        if isinstance(checks, dict):
            checks = Checks.model_validate(checks)
        return cls(checks=checks, **kwargs)


class Session:
    """The watch one ``fit``/``train`` runs under."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.scope: Watch | None = None
        self.report: Report | None = None

    def open(
        self,
        model: nn.Module,
        optimizer: Any,
        scaler: torch.amp.GradScaler | None,
        on_step: Callable[[StepRecord], None],
        say: Callable[[int, str], None] | None = None,
    ) -> Watch:
        """Start watching (a watch left open by an earlier run is closed first); ``say(level, text)``
        is the trainer's own channel for the findings the watch speaks (unless ``quiet``)."""
        self.close()
        o = self.options
        scope = Watch(
            model,
            optimizer,
            scaler,
            outputs=Outputs(logdir=o.logdir, json=o.json, speak=not o.quiet and say is not None, say=say),
            reporters=build_reporters,
            raise_on=o.raise_on,
            checks=o.checks,
            activations=o.activations,
            locate=o.locate,
            histograms_every=o.histograms_every if o.logdir else 0,
            on_step=on_step,
            every=o.every,
            probes=o.probes,
        )
        self.scope = scope.__enter__()
        return scope

    def close(self) -> Report | None:
        """Take every hook off and write the outputs (the watch's reporters), keeping the report; a
        second call does nothing."""
        scope, self.scope = self.scope, None
        if scope is None:
            return self.report
        try:
            scope.__exit__(None, None, None)
        finally:
            self.report = scope.report
        return self.report


def numbers(record: StepRecord, prefix: str, per_parameter: bool) -> dict[str, float]:
    """A step's numbers for a trainer's logger: the unclipped total norm, the clip factor, the
    NaN/Inf entries, and (``per_parameter``) each parameter's norm."""
    out = {f"{prefix}grad_norm": record.grad_norm_total}
    if record.clip_coefficient is not None:
        out[f"{prefix}clip_coefficient"] = record.clip_coefficient
    bad = sum(s.nan_count + s.inf_count for s in record.parameters.values())
    out[f"{prefix}nonfinite_entries"] = float(bad)
    if per_parameter:
        for name, stats in record.parameters.items():
            out[f"{prefix}grad_norm/{name}"] = stats.grad_norm
        for probe, values in record.probes.items():  # the optional probes', e.g. update_ratio/<param>
            out.update({f"{prefix}{probe}/{key}": value for key, value in values.items()})
    return {k: v for k, v in out.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
