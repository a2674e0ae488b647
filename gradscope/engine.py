"""The instrumented training step: forward, loss, backward, measure, clip, optimizer step.

One ``Engine.step`` is what a user's own loop does (``zero_grad``, forward
under autocast, backward through the grad scaler, ``unscale_``,
``clip_grad_norm_``, ``optimizer.step``), with the gradient probe reading
the true (unscaled, unclipped) gradients in between.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradscope import stats
from gradscope.config import ClipSpec
from gradscope.errors import ConfigError, GradscopeError, ModelError
from gradscope.loading import Batch, LossFn, call_model
from gradscope.probes.gradients import GradientProbe
from gradscope.report import StepRecord

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepPlan:
    """How each step runs."""

    device: torch.device
    precision: str = "fp32"
    clip: ClipSpec | None = None
    pass_labels: bool = False  # `loss: output`: the model gets `labels=` and returns its loss


class Engine:
    """Runs instrumented steps of ``model`` on one batch.

    Args:
        model: already on ``plan.device``.
        optimizer: stepped after each backward (``loading.NoUpdate`` keeps the weights).
        loss_fn: ``fn(output, labels) -> scalar``.
        probe: an entered ``GradientProbe`` on ``model``.
        plan: device, precision, clipping.
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, probe: GradientProbe, plan: StepPlan
    ) -> None:
        self.model, self.optimizer, self.loss_fn, self.probe, self.plan = model, optimizer, loss_fn, probe, plan
        fp16 = plan.precision == "fp16"
        self.scaler = torch.amp.GradScaler(plan.device.type) if fp16 else None
        self.trainable = [info for info in probe.infos if info.trainable]

    def step(self, index: int, batch: Batch) -> StepRecord:
        """One forward/backward/update; returns what it measured."""
        self.probe.begin_step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._forward(batch)
        self._backward(loss)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # measure and clip the true gradients
        scale = _scale_tensor(self.scaler) if self.scaler is not None else None
        readings = self.probe.read([loss] + ([scale] if scale is not None else []))
        if self.plan.clip is not None:
            clip = self.plan.clip
            torch.nn.utils.clip_grad_norm_(self.probe.params, clip.max_norm, clip.norm_type)
        self._update()
        return self._record(index, readings)

    def _forward(self, batch: Batch) -> torch.Tensor:
        with _autocast(self.plan):
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

    def _backward(self, loss: torch.Tensor) -> None:
        try:
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        except Exception as exc:
            raise ModelError("model", "the backward pass", exc) from exc

    def _update(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _record(self, index: int, readings: Any) -> StepRecord:
        params = stats.parameter_stats(self.trainable, readings)
        total = stats.total_norm(params)
        record: dict[str, Any] = {}
        if self.plan.clip is not None:
            clip_norm = stats.clip_norm(readings, self.plan.clip.norm_type)
            coef = stats.clip_coefficient(clip_norm, self.plan.clip.max_norm)
            record.update(clip_norm=clip_norm, clip_coefficient=coef, grad_norm_total_clipped=total * coef)
        if self.scaler is not None:
            # The scaler skips the update when any unscaled gradient is non-finite.
            skipped = any(s.nan_count or s.inf_count for s in params.values())
            record.update(loss_scale=readings.scalars[1], skipped=skipped)
        return StepRecord(
            step=index,
            loss=readings.scalars[0],
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
        raise ConfigError([("loss", f"expected a scalar loss, got a tensor of shape {tuple(loss.shape)}; reduce it (e.g. .mean())")])
    if not loss.requires_grad:
        raise ConfigError([("loss", "the loss does not depend on any trainable parameter (all frozen, or the output was detached)")])


@contextlib.contextmanager
def checkpointing(model: nn.Module, patterns: list[str]) -> Iterator[list[str]]:
    """Run the modules whose qualified names match ``patterns`` under activation checkpointing.

    Each matching module's ``forward`` is wrapped in
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` for the
    duration of the block and restored afterwards, also on error. Modules
    inside an already-checkpointed module are left alone.

    Yields:
        The qualified names of the checkpointed modules.

    Raises:
        ConfigError: a pattern matches no module.
    """
    chosen = _matching_modules(model, patterns)
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for _, module in chosen:
            patched.append((module, module.__dict__.get("forward")))
            module.forward = _checkpointed(module.forward)  # type: ignore[method-assign]
        yield [name for name, _ in chosen]
    finally:
        for module, original in patched:
            if original is None:
                del module.forward
            else:
                module.forward = original  # type: ignore[method-assign]


def _matching_modules(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Module]]:
    names = [name for name, _ in model.named_modules() if name]
    for i, pattern in enumerate(patterns):
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError([(f"checkpointing.modules[{i}]", f"pattern {pattern!r} matches no module; modules are: {sample}")])
    chosen: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(parent + ".") for parent, _ in chosen)
        if name and not inside and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            chosen.append((name, module))
    return chosen


def _checkpointed(forward: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _autocast(plan: StepPlan) -> contextlib.AbstractContextManager[Any]:
    if plan.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(plan.device.type, dtype=AUTOCAST_DTYPES[plan.precision])


def _scale_tensor(scaler: torch.amp.GradScaler) -> torch.Tensor:
    # get_scale() would sync the host; the scale tensor joins the step's one transfer instead.
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, torch.Tensor) else torch.tensor(scaler.get_scale())


def _describe_output(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"output {tuple(output.shape)} {str(output.dtype).removeprefix('torch.')}"
    return f"output {type(output).__name__}"
