"""Where a watched step's first NaN/Inf was made: which step to search, on which ranks, by which replay.

A step whose loss or gradients are not finite is replayed (``replay.locate``) from the model's
last forward call (``capture.ForwardCapture``), or from a replay of the whole step that the
driver gives (the engine's). One fault, one finding: once an origin is found, later steps are
not searched. In a distributed run the ranks whose own loss or gradients went bad replay, and
every rank reports the first rank's finding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from gradscope.locate import replay
from gradscope.locate.capture import ForwardCapture
from gradscope.report import NonfiniteOrigin, StepRecord, tables
from gradscope.utils.optional import optional


@dataclass(frozen=True)
class Replay:
    """How to replay a whole step (model and loss) when it shows a NaN/Inf: the driver knows."""

    forward: Callable[[], torch.Tensor]
    state: replay.RngState
    inputs: dict[str, torch.Tensor]


class OriginSearch:
    """Finds the origin of the first non-finite step.

    Args:
        model: the user's module (inside DDP), where replays run.
        capture: the model's last forward call, or None (``locate`` off).
        ranks: a distributed run's ``distributed.Ranks``, or None.
        pause: called with True before a replay and False after it (probes that must not see it).
        enabled: False: never search.
    """

    def __init__(
        self,
        model: nn.Module,
        capture: ForwardCapture | None,
        ranks: Any = None,
        pause: Callable[[bool], None] | None = None,
        enabled: bool = True,
        notes: list[str] | None = None,
    ) -> None:
        self.model, self.capture, self.ranks, self.enabled = model, capture, ranks, enabled
        self.notes = notes if notes is not None else []
        self.pause = pause or (lambda paused: None)
        self.located = False
        self.overflow_located = False
        self._applied = False  # the grad scaler applied a step: its scale is calibrated

    def find(self, record: StepRecord, step_replay: Replay | None) -> NonfiniteOrigin | None:
        """The origin of the record's NaN/Inf, or None (none, found before, or not searchable)."""
        bad = tables.nonfinite(record.parameters)
        loss_bad = not finite(record.loss)
        if self.located or not self.enabled or not (bad or loss_bad):
            return None
        if self.capture is None and step_replay is None:
            return None
        if record.skipped and step_replay is None and not loss_bad:
            return None  # an overflow of the scaled gradients: the scaler skipped the step; loss_scale_overflow
        if loss_bad:
            kind = "nan" if math.isnan(record.loss) else "inf"  # type: ignore[arg-type]
        else:
            kind = "nan" if any(s.nan_count for s in bad) else "inf"
        origin = self._search(record, kind, loss_bad, step_replay)
        self.located = origin is not None  # one fault, one finding
        return origin

    def find_overflow(self, record: StepRecord, step_replay: Replay | None) -> NonfiniteOrigin | None:
        """Where the scaled gradients of a step the grad scaler skipped first overflowed, or None.

        Searched once per run, at the first skip after the scaler has applied a step (or once its
        scale fell below 1): the skips before are its calibration. It needs the whole step's replay
        (the loss's true gradient sets what overflows), which ``gradscope inspect`` and the Lightning
        callback give; a plain ``gradscope.watch`` loop has only the model's forward.
        """
        if record.loss_scale is not None and not record.skipped:
            self._applied = True
        calibrated = self._applied or (record.loss_scale is not None and record.loss_scale < 1.0)
        if not (record.skipped and calibrated and self.enabled) or self.overflow_located or step_replay is None:
            return None
        if self.ranks is not None or not finite(record.loss):
            return None  # a distributed step's overflow is searched on no rank; a bad loss is a NaN's
        self.overflow_located = True
        r, scale = step_replay, record.loss_scale
        return self._paused(
            "the replay that locates the scaled gradients' overflow",
            lambda: replay.overflow_origin(self.model, r.forward, r.state, scale),  # type: ignore[arg-type]
        )

    def _search(
        self, record: StepRecord, kind: str, loss_bad: bool, step_replay: Replay | None
    ) -> NonfiniteOrigin | None:
        ranks = self.ranks
        if ranks is None:
            return self._replay(kind, loss_bad, step_replay, lockstep=False)
        suspects = {r.rank for r in record.ranks if r.bad} or set(range(ranks.world))  # none can tell: all
        origin = None
        if ranks.sharded or ranks.rank in suspects:
            # FSDP replays gather parameters: every rank replays with the others.
            own_loss_bad = not finite(record.ranks[ranks.rank].loss)
            origin = self._replay(kind, own_loss_bad, step_replay, lockstep=ranks.sharded)
        rank, origin = ranks.first_found(origin if ranks.rank in suspects else None)
        return replace(origin, rank=rank) if origin is not None else None

    def _replay(self, kind: str, loss_bad: bool, step_replay: Replay | None, lockstep: bool) -> NonfiniteOrigin | None:
        def search() -> NonfiniteOrigin | None:
            if step_replay is not None:
                r = step_replay
                return replay.locate(self.model, r.inputs, r.forward, r.state, kind, lockstep)
            return self.capture.locate(kind, loss_bad, lockstep)  # type: ignore[union-attr]

        return self._paused("the replay that locates the first NaN/Inf", search)

    def _paused(self, what: str, search: Callable[[], NonfiniteOrigin | None]) -> NonfiniteOrigin | None:
        """``search()`` with the probes paused; None, with a note, when the model does not allow it."""
        self.pause(True)
        try:
            with optional(what, self.notes):
                return search()
            return None
        finally:
            self.pause(False)


def finite(value: float | None) -> bool:
    """An unknown value (None) counts as finite."""
    return value is None or math.isfinite(value)
