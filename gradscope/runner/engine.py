"""The config-driven training step: forward, loss, backward, clip, optimizer step.

One ``Engine.step`` is what a user's own loop does (``zero_grad``, forward
under autocast, backward through the grad scaler, ``unscale_``,
``clip_grad_norm_``, ``optimizer.step``), observed by the same ``Watch`` that
``gradscope.watch`` puts on a user's loop. Being the driver, it records each
step before clipping and gives the watch a replay of the whole step (model and
loss), and compares the first step of a low-precision run with an fp32 step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradscope.config import ClipSpec
from gradscope.errors import ConfigError, GradscopeError, ModelError, RankFailure, peer_failed
from gradscope.locate import replay
from gradscope.locate.locating import Replay
from gradscope.observe import distributed
from gradscope.observe.history import Retention
from gradscope.observe.watch import Watch
from gradscope.probes import functions
from gradscope.probes.memory import MemoryOptions
from gradscope.report import BackwardFailure, GradcheckResult, StepRecord
from gradscope.runner.loading import Batch, LossFn, call_model
from gradscope.utils.optional import optional
from gradscope.utils.wrappers import unwrap

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
    every: int = 1  # measure every N-th step only
    scaler: bool = True  # fp16: scale the loss with a GradScaler (off: gradients as fp16 makes them)
    probes: tuple[str, ...] = ()  # optional probes by name (``gradscope.probes.OPTIONAL``)
    memory: MemoryOptions | None = None  # the memory ledger of the first step (None: off)


class Engine:
    """Drives instrumented steps of ``model`` on one batch, as a user's loop would, under a ``Watch``:
    the measuring, recording and judging are the ones ``gradscope.watch`` does in a user's own loop.

    Args:
        model: already on ``plan.device``.
        optimizer: stepped after each backward (``loading.NoUpdate`` keeps the weights).
        loss_fn: ``fn(output, labels) -> scalar``.
        plan: device, precision, clipping, what to look at.
        on_step: called with each step's record as soon as it is measured.
        ranks: a distributed run (``model`` wrapped in DDP or sharded by FSDP).
        retention: which steps the watch keeps in full (None: ``history.Retention``'s defaults).

    Attributes:
        watch: enter it around the steps (``with engine.watch:``); its hooks come off on exit.
        stopped: backward raised; no further step can run.
        gradchecks: with ``plan.gradcheck``, each custom autograd.Function's check.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        plan: StepPlan,
        on_step: Callable[[StepRecord], None] | None = None,
        ranks: distributed.Ranks | None = None,
        retention: Retention | None = None,
    ) -> None:
        self.model, self.optimizer, self.loss_fn, self.plan = model, optimizer, loss_fn, plan
        # Replays run here: on one rank, without DDP's all-reduce; a compiled model's eager original.
        self.inner = unwrap(model, compiled=True)
        self.ranks = ranks
        fp16_scaled = plan.precision == "fp16" and plan.scaler
        self.scaler = torch.amp.GradScaler(plan.device.type) if fp16_scaled else None
        self.watch = Watch(
            model,
            optimizer,
            self.scaler,
            activations=plan.activations,
            locate=plan.localize,
            histograms_every=plan.histograms_every,
            clip=plan.clip,
            on_step=on_step,
            recorded_before_clipping=True,
            loop=False,  # its own loop
            every=plan.every,
            ranks=ranks,
            retention=retention,
            probes=plan.probes,
            memory=plan.memory or False,
        )
        self.stopped = False
        self.gradchecks: tuple[GradcheckResult, ...] = ()

    def step(self, index: int, batch: Batch) -> StepRecord | None:
        """One forward/backward/update; what it measured (None on a step ``every`` leaves out)."""
        state = replay.rng_state()
        self.optimizer.zero_grad(set_to_none=True)
        with self.watch.forward_window((batch.inputs, batch.labels)):  # the memory ledger sees model and loss
            loss = self._first_forward(batch) if index == 0 else self.forward(batch)
        failure = self._backward(loss, batch, state)
        if failure is not None:
            self.stopped = True
            return self.watch.record_failure(float(loss.detach()), failure)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # measure and clip the true gradients
        extra = {"underflow": self._underflow(batch, state)} if index == 0 else {}
        tensors = replay.batch_tensors(batch.inputs, batch.labels)
        # Recorded before clipping, with a replay of the whole step (model and loss) should it show a NaN.
        step_replay = Replay(lambda: self.forward(batch, model=self.inner), state, tensors)
        record = self.watch.step(loss, replay=step_replay, **extra)
        if self.plan.clip is not None:
            clip = self.plan.clip
            torch.nn.utils.clip_grad_norm_(self.watch.gradients.params, clip.max_norm, clip.norm_type)
        self._update()
        return record

    def forward(self, batch: Batch, precision: str | None = None, model: nn.Module | None = None) -> torch.Tensor:
        """Model (``self.model`` unless given) and loss on ``batch`` under autocast; the checked scalar loss."""
        with _autocast(self.plan.device, precision or self.plan.precision):
            try:
                output = call_model(model or self.model, batch, self.plan.pass_labels)
            except GradscopeError:
                raise
            except (Exception, SystemExit) as exc:
                if self.ranks is not None and peer_failed(exc):
                    raise RankFailure(self.ranks.rank, exc) from exc
                raise ModelError("model", f"the forward pass on {batch.describe()}", exc) from exc
            try:
                loss = self.loss_fn(output, batch.labels)
            except GradscopeError:
                raise
            except (Exception, SystemExit) as exc:
                raise ModelError("loss", f"the loss on {_describe_output(output)} and {batch.describe()}", exc) from exc
        check_loss(loss)
        return loss

    def _first_forward(self, batch: Batch) -> torch.Tensor:
        if not self.plan.gradcheck:
            return self.forward(batch)
        with functions.capturing(self.watch.tracker) as applied:
            loss = self.forward(batch)
        with optional("the gradcheck of custom autograd.Functions", self.watch.notes):
            self.gradchecks = tuple(functions.check(cls, args, module) for cls, (args, module) in applied.items())
        return loss

    def _backward(self, loss: torch.Tensor, batch: Batch, state: replay.RngState) -> BackwardFailure | None:
        try:
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        except RuntimeError as exc:
            if self.ranks is not None and peer_failed(exc):
                raise RankFailure(self.ranks.rank, exc) from exc
            replayed = lambda: self.forward(batch, model=self.inner)  # noqa: E731
            site: dict[str, str | None] = {}
            with optional("the replay that names the failing backward node", self.watch.notes), self.watch.paused():
                site = replay.backward_error_site(self.inner, replayed, state)
            message = str(exc).split(" Hint:")[0]  # PyTorch's hint suggests the anomaly mode used here already
            return BackwardFailure(f"{type(exc).__name__}: {message}", **site)
        except (Exception, SystemExit) as exc:
            raise ModelError("model", "the backward pass", exc) from exc
        return None

    def _underflow(self, batch: Batch, state: replay.RngState) -> dict[str, float] | None:
        if self.plan.precision == "fp32" or not self.plan.underflow or self.ranks is not None:
            return None  # distributed: .grad is averaged over ranks, a replay sees one rank's batch
        replayed = lambda: self.forward(batch, precision="fp32", model=self.inner)  # noqa: E731
        dtype = AUTOCAST_DTYPES[self.plan.precision]
        scale = self.scaler.get_scale() if self.scaler is not None else 1.0  # the backward ran at it
        with optional("the fp32 replay that measures gradient underflow", self.watch.notes), self.watch.paused():
            return replay.underflow(self.inner, replayed, state, dtype, scale)
        return None

    def _update(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()


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


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def _describe_output(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"output {tuple(output.shape)} {str(output.dtype).removeprefix('torch.')}"
    return f"output {type(output).__name__}"
