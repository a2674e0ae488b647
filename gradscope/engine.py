"""The instrumented training step: forward, loss, backward, measure, clip, optimizer step.

One ``Engine.step`` is what a user's own loop does (``zero_grad``, forward
under autocast, backward through the grad scaler, ``unscale_``,
``clip_grad_norm_``, ``optimizer.step``), with the probes reading the true
(unscaled, unclipped) gradients in between. A step that shows a NaN/Inf, or
the first step of a low-precision run, is replayed to look closer
(``gradscope.replay``) before the weights change.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from gradscope import replay, stats
from gradscope.config import ClipSpec
from gradscope.errors import ConfigError, GradscopeError, ModelError
from gradscope.loading import Batch, LossFn, call_model
from gradscope.probes import functions
from gradscope.probes.activations import ActivationProbe
from gradscope.probes.gradients import Fetch, GradientProbe, Readings
from gradscope.probes.histograms import WIDTH, gradient_histograms, to_histogram
from gradscope.probes.modules import ModuleTracker
from gradscope.probes.origins import bad_kind
from gradscope.report import BackwardFailure, GradcheckResult, NonfiniteOrigin, StepRecord

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepPlan:
    """How each step runs and what it looks at."""

    device: torch.device
    precision: str = "fp32"
    clip: ClipSpec | None = None
    pass_labels: bool = False  # `loss: output`: the model gets `labels=` and returns its loss
    activations: bool = True  # dead/saturated unit statistics and which modules ran
    localize: bool = True  # replay a step with a NaN/Inf to find where it was made
    underflow: bool = True  # low precision: compare the first step's gradients with fp32
    gradcheck: bool = False  # check custom autograd.Functions' backward against finite differences
    histograms_every: int = 0  # gradient histograms every N steps (0: never)


class Engine:
    """Runs instrumented steps of ``model`` on one batch.

    Args:
        model: already on ``plan.device``.
        optimizer: stepped after each backward (``loading.NoUpdate`` keeps the weights).
        loss_fn: ``fn(output, labels) -> scalar``.
        probe: an entered ``GradientProbe`` on ``model``.
        plan: device, precision, clipping, what to look at.

    Attributes:
        stopped: backward raised; no further step can run.
        called: names of the modules that ran in the first forward (None until then).
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, probe: GradientProbe, plan: StepPlan
    ) -> None:
        self.model, self.optimizer, self.loss_fn, self.probe, self.plan = model, optimizer, loss_fn, probe, plan
        self.scaler = torch.amp.GradScaler(plan.device.type) if plan.precision == "fp16" else None
        self.trainable = [info for info in probe.infos if info.trainable]
        self.tracker = ModuleTracker(model) if plan.activations else None
        self.located = False  # one fault, one finding: stop looking once an origin is found
        self.stopped = False
        self.called: tuple[str, ...] | None = None
        self.gradchecks: tuple[GradcheckResult, ...] = ()

    def step(self, index: int, batch: Batch) -> StepRecord:
        """One forward/backward/update; returns what it measured."""
        state = replay.rng_state()
        self.probe.begin_step()
        self.optimizer.zero_grad(set_to_none=True)
        loss, activations = self._observed_forward(batch)
        failure = self._backward(loss, batch, state)
        if failure is not None:
            self.stopped = True
            return StepRecord(index, float(loss.detach()), math.nan, {}, {}, backward_error=failure)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # measure and clip the true gradients
        fetch = Fetch()
        fetch.add("loss", loss)
        if self.scaler is not None:
            fetch.add("scale", _scale_tensor(self.scaler))
        histogram_names = self._histograms(index, fetch)
        if activations is not None:
            fetch.add("activations", *activations.counts)
        readings = self.probe.read(fetch.tensors)
        values = fetch.split(readings.scalars)
        origin = self._locate(readings, batch, state)
        underflow = self._underflow(batch, state) if index == 0 and not readings.nonfinite else None
        if self.plan.clip is not None:
            clip = self.plan.clip
            torch.nn.utils.clip_grad_norm_(self.probe.params, clip.max_norm, clip.norm_type)
        self._update()
        record = self._record(index, readings, values, origin, underflow)
        if activations is not None:
            record = replace(record, activations=activations.results(values["activations"]))
        if histogram_names:
            rows = values["histograms"]
            found = {n: to_histogram(rows[i * WIDTH : (i + 1) * WIDTH]) for i, n in enumerate(histogram_names)}
            record = replace(record, histograms=found)
        return record

    def _histograms(self, index: int, fetch: Fetch) -> list[str]:
        every = self.plan.histograms_every
        if not every or index % every:
            return []
        params = [(self.probe.names[i], self.probe.params[i].grad) for i in self.probe.arrived()]
        named = [(name, grad) for name, grad in params if grad is not None]
        fetch.add("histograms", gradient_histograms([grad for _, grad in named]))
        return [name for name, _ in named]

    def forward(self, batch: Batch, precision: str | None = None) -> torch.Tensor:
        """Model and loss on ``batch`` under autocast; the checked scalar loss."""
        with _autocast(self.plan.device, precision or self.plan.precision):
            try:
                output = call_model(self.model, batch, self.plan.pass_labels)
            except GradscopeError:
                raise
            except Exception as exc:
                raise ModelError("model", f"the forward pass on {batch.describe()}", exc) from exc
            try:
                loss = self.loss_fn(output, batch.labels)
            except GradscopeError:
                raise
            except Exception as exc:
                raise ModelError("loss", f"the loss on {_describe_output(output)} and {batch.describe()}", exc) from exc
        check_loss(loss)
        return loss

    def _observed_forward(self, batch: Batch) -> tuple[torch.Tensor, ActivationProbe | None]:
        first = self.called is None
        with contextlib.ExitStack() as stack:
            activations = None
            if self.tracker is not None:
                stack.enter_context(self.tracker)
                activations = stack.enter_context(ActivationProbe(self.tracker))
            applied = stack.enter_context(functions.capturing(self.tracker)) if first and self.plan.gradcheck else None
            loss = self.forward(batch)
        if first:
            self.called = tuple(self.tracker.calls) if self.tracker is not None else ()  # in order of first call
        if applied:
            self.gradchecks = tuple(functions.check(cls, args, module) for cls, (args, module) in applied.items())
        return loss, activations

    def _backward(self, loss: torch.Tensor, batch: Batch, state: replay.RngState) -> BackwardFailure | None:
        try:
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        except RuntimeError as exc:
            node, source = replay.backward_error_site(self.model, lambda: self.forward(batch), state)
            message = str(exc).split(" Hint:")[0]  # PyTorch's hint suggests the anomaly mode used here already
            return BackwardFailure(f"{type(exc).__name__}: {message}", node, source)
        except Exception as exc:
            raise ModelError("model", "the backward pass", exc) from exc
        return None

    def _locate(self, readings: Readings, batch: Batch, state: replay.RngState) -> NonfiniteOrigin | None:
        loss = readings.scalars[0]
        if self.located or not self.plan.localize or (math.isfinite(loss) and not readings.nonfinite):
            return None
        kind = bad_kind(loss) if not math.isfinite(loss) else _grad_kind(readings)
        tensors = replay.batch_tensors(batch.inputs, batch.labels)
        origin = replay.locate(self.model, tensors, lambda: self.forward(batch), state, kind)
        self.located = origin is not None
        return origin

    def _underflow(self, batch: Batch, state: replay.RngState) -> dict[str, float] | None:
        if self.plan.precision == "fp32" or not self.plan.underflow:
            return None
        return replay.underflow(self.model, lambda: self.forward(batch, precision="fp32"), state)

    def _update(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _record(
        self,
        index: int,
        readings: Readings,
        values: dict[str, list[float]],
        origin: NonfiniteOrigin | None,
        underflow: dict[str, float] | None,
    ) -> StepRecord:
        params = stats.parameter_stats(self.trainable, readings)
        total = stats.total_norm(params)
        record: dict[str, Any] = {"origin": origin, "underflow": underflow}
        if self.plan.clip is not None:
            clip_norm = stats.clip_norm(readings, self.plan.clip.norm_type)
            coef = stats.clip_coefficient(clip_norm, self.plan.clip.max_norm)
            record.update(clip_norm=clip_norm, clip_coefficient=coef, grad_norm_total_clipped=total * coef)
        if self.scaler is not None:
            # The scaler skips the update when any unscaled gradient is non-finite.
            skipped = any(s.nan_count or s.inf_count for s in params.values())
            record.update(loss_scale=values["scale"][0], skipped=skipped)
        return StepRecord(
            step=index,
            loss=values["loss"][0],
            grad_norm_total=total,
            parameters=params,
            modules=stats.module_stats(self.trainable, params),
            **record,
        )


def check_loss(loss: Any) -> None:
    """The loss must be a scalar tensor that depends on trainable parameters (no host sync)."""
    if not isinstance(loss, torch.Tensor):
        raise ConfigError([("loss", f"expected the loss to be a scalar tensor, got {type(loss).__name__}")])
    if loss.numel() != 1:
        raise ConfigError(
            [("loss", f"expected a scalar loss, got a tensor of shape {tuple(loss.shape)}; reduce it (e.g. .mean())")]
        )
    if not loss.requires_grad:
        raise ConfigError(
            [("loss", "the loss does not depend on any trainable parameter (all frozen, or the output was detached)")]
        )


def _grad_kind(readings: Readings) -> str:
    return "nan" if any(nans for nans, _ in readings.nonfinite.values()) else "inf"


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def _scale_tensor(scaler: torch.amp.GradScaler) -> torch.Tensor:
    # get_scale() would sync the host; the scale tensor joins the step's one transfer instead.
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, torch.Tensor) else torch.tensor(scaler.get_scale())


def _describe_output(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"output {tuple(output.shape)} {str(output.dtype).removeprefix('torch.')}"
    return f"output {type(output).__name__}"
