"""A step's fetched gradient readings as a ``StepRecord``: the clip and loss-scale arithmetic.

The watch may measure the gradients after the user clipped them (at the optimizer step), so
the norms taken at the end of backward, before any clipping (and before unscaling), tell what
clipping multiplied the gradients by; the record reports the true gradients and that factor.
From that factor and the true norms, ``ClipSeen`` tells the ``max_norm`` and ``norm_type`` the
user's ``clip_grad_norm_`` was given.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from gradscope.config import ClipSpec
from gradscope.probes.base import Fetch, Probe, StepContext
from gradscope.probes.gradients import GradientProbe
from gradscope.report import StepRecord, stats
from gradscope.report.rows import EXTRA_NORM, GRAD_MAX_ABS, GRAD_NORM, Readings
from gradscope.report.tables import Layout

# Names of the recorder's own parts of the step's transfer.
LOSS, PRE, SCALE = "loss", "pre", "scale"


class Recorder:
    """Turns the gradient probe's readings of a step into its ``StepRecord``.

    Args:
        gradients: the watch's gradient probe.
        clip: the clipping a driver applies after recording (None: the user's own, if any).
        scaler: the user's grad scaler, or None.
    """

    def __init__(self, gradients: GradientProbe, clip: ClipSpec | None, scaler: torch.amp.GradScaler | None) -> None:
        self.gradients, self.clip, self.scaler = gradients, clip, scaler
        self.trainable = [info for info in gradients.infos if info.trainable]
        self.layout = Layout(self.trainable)
        self.seen = ClipSeen()  # the user's own clipping, as the clipped steps show it

    def collect(self, fetch: Fetch, loss: torch.Tensor | None, pre: tuple[list[int], torch.Tensor] | None) -> None:
        """Add the loss, the end-of-backward norms ``pre`` and the loss scale to the step's transfer."""
        fetch.add(LOSS, loss.detach().float() if loss is not None else torch.tensor(math.nan))
        fetch.add(PRE, pre[1] if pre is not None else torch.zeros(0))
        if self.scaler is not None:
            fetch.add(SCALE, scale_tensor(self.scaler))

    def measure(
        self, step: StepContext, probes: list[Probe], pre: tuple[list[int], torch.Tensor] | None, skipped: bool
    ) -> StepRecord:
        """The step's statistics on the device, fetched with every probe's tensors in one transfer.

        Args:
            step: the step being measured.
            probes: the probes besides the gradient probe; each adds its tensors and record fields.
            pre: the norms taken at the end of backward (None: none taken, the gradients are measured
                as they were then).
            skipped: the grad scaler skipped this step's update.
        """
        fetch = Fetch()
        self.collect(fetch, step.loss, pre)
        for probe in probes:
            fetch.add(probe.name, *probe.collect(step))
        # Gradients that arrived in backward but are None now: a zero_grad() between backward and step.
        gone = [i for i in self.gradients.arrived() if self.gradients.params[i].grad is None]
        readings = self.gradients.fetch(self.gradients.measure(), fetch.tensors)
        values = fetch.split(readings.scalars)
        pre_index = pre[0] if pre is not None else None
        record = self.record(step.index, readings, values, pre_index, step.loss is not None, skipped, gone)
        for probe in probes:
            record = replace(record, **probe.contribute(values[probe.name], record))
        return record

    def record(
        self,
        index: int,
        readings: Readings,
        values: dict[str, list[float]],
        pre_index: list[int] | None,
        loss_known: bool,
        skipped: bool = False,
        gone: list[int] | None = None,
    ) -> StepRecord:
        """The step's record (its rows of ``readings`` are divided by the clip factor in place).

        Args:
            index: the step's number.
            readings: the gradient probe's fetched readings.
            values: the fetched transfer, split by name.
            pre_index: the parameters of the end-of-backward norms (None: none were taken).
            loss_known: the loss was given (else the record's loss is None).
            skipped: the grad scaler skipped this step's update.
            gone: the parameters whose gradient arrived in backward but is None now.
        """
        scale = values[SCALE][0] if SCALE in values else 1.0
        pre = dict(zip(pre_index, values[PRE])) if pre_index is not None else None
        post = stats.combine_norms([row[GRAD_NORM] for row in readings.rows])
        # The end-of-backward norms are before any clipping (and before unscaling, by `scale`).
        before = stats.combine_norms([pre.get(i, 0.0) / scale for i in readings.index]) if pre is not None else post
        measured = post / before if before and math.isfinite(before) else 1.0
        # Every gradient zero now that was not at the end of backward: zeroed, not clipped.
        zeroed = pre is not None and post == 0.0 and measured == 0.0
        measured = 1.0 if zeroed else measured
        clipped = abs(measured - 1.0) > 1e-6  # the user's clipping ran before this record
        if clipped and measured > 0:
            unclip(readings, measured)
        params = stats.parameter_stats(self.layout, readings)
        total = stats.total_norm(readings)
        extra = self._clipping(readings, total, post, measured, clipped)
        if self.scaler is not None:
            # The scaler skips the update exactly when an unscaled gradient is not finite.
            skipped = skipped or bool(readings.nonfinite)
            extra.update(loss_scale=scale, skipped=skipped)
        return StepRecord(
            step=index,
            loss=values[LOSS][0] if loss_known else None,
            grad_norm_total=total,
            parameters=params,
            modules=stats.module_stats(params),
            stale=tuple(self.gradients.names[i] for i in sorted(self.gradients.stale)),
            cleared=self._cleared(gone or [], pre if zeroed else None),
            **extra,
        )

    def _cleared(self, gone: list[int], zeroed: dict[int, float] | None) -> tuple[str, ...]:
        """The names of the gradients cleared since backward: None now, or zeros that were not."""
        index = set(gone)
        if zeroed is not None:
            index.update(i for i, norm in zeroed.items() if norm > 0)
        return tuple(self.gradients.names[i] for i in sorted(index))

    def _clipping(
        self, readings: Readings, total: float, post: float, measured: float, clipped: bool
    ) -> dict[str, Any]:
        if self.clip is not None:
            clip_norm = stats.clip_norm(readings, self.clip.norm_type)
            coefficient = measured if clipped else stats.clip_coefficient(clip_norm, self.clip.max_norm)
            return {
                "clip_norm": clip_norm,
                "clip_coefficient": coefficient,
                "grad_norm_total_clipped": total * coefficient,
            }
        if clipped:
            self.seen.add(total, stats.clip_norm(readings, math.inf), measured)
            return {
                "clip_norm": self._seen_norm(readings),
                "clip_coefficient": measured,
                "grad_norm_total_clipped": post,
            }
        spec = self.seen.spec
        if spec is not None and math.isfinite(total):
            clip_norm = self._seen_norm(readings)
            if stats.clip_coefficient(clip_norm, spec.max_norm) == 1.0:  # below max_norm: clipping left it as it was
                return {"clip_norm": clip_norm, "clip_coefficient": 1.0, "grad_norm_total_clipped": total}
        return {}

    def _seen_norm(self, readings: Readings) -> float:
        spec = self.seen.spec
        return stats.clip_norm(readings, spec.norm_type if spec is not None else 2.0)


class ClipSeen:
    """The ``max_norm`` and ``norm_type`` of the user's ``clip_grad_norm_``, told by the steps it clipped.

    A clipped step multiplied the gradients by ``max_norm / (norm + 1e-6)``; knowing the factor and
    the true gradients, ``max_norm`` follows for each norm it could have used. The L2 norm (the
    default) is taken unless the clipped steps agree on one ``max_norm`` only under the max-norm
    (``norm_type=inf``); steps that agree under neither (a schedule of ``max_norm``, another
    ``norm_type``) leave it unknown.
    """

    TOLERANCE = 1e-3  # relative: the factor and the norms are float32 on the device

    def __init__(self) -> None:
        self._first: dict[float, float] = {}  # norm_type -> max_norm told by the first clipped step
        self._agree = {2.0: True, math.inf: True}
        self.spec: ClipSpec | None = None  # what the clipped steps agree on (None: none yet, or no one max_norm)

    def add(self, l2: float, linf: float, coefficient: float) -> None:
        """One clipped step: its true L2 and max norms and the factor clipping applied."""
        if not 0.0 < coefficient < 1.0:
            return
        for norm_type, norm in ((2.0, l2), (math.inf, linf)):
            if math.isfinite(norm):
                max_norm = coefficient * (norm + 1e-6)
                first = self._first.setdefault(norm_type, max_norm)
                self._agree[norm_type] &= abs(max_norm - first) <= self.TOLERANCE * first
        agreed = [n for n in (2.0, math.inf) if n in self._first and self._agree[n]]
        # 4 significant digits: the float32 factor tells no more of the max_norm the user wrote
        self.spec = ClipSpec(max_norm=float(f"{self._first[agreed[0]]:.4g}"), norm_type=agreed[0]) if agreed else None


def unclip(readings: Readings, factor: float) -> None:
    """Clipping multiplied every gradient by ``factor``: the true gradient is the one before."""
    for row in readings.rows:
        row[GRAD_NORM] /= factor
        row[GRAD_MAX_ABS] /= factor
        if len(row) > EXTRA_NORM:
            row[EXTRA_NORM] /= factor


def scale_tensor(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The scaler's current scale as a tensor: ``get_scale()`` would sync the host, the tensor joins
    the step's one transfer instead."""
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, torch.Tensor) else torch.tensor(scaler.get_scale())
