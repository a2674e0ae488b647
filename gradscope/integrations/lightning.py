"""gradscope inside PyTorch Lightning::

    from gradscope.integrations.lightning import GradscopeCallback

    callback = GradscopeCallback(json="grads.json", raise_on="error")
    trainer = lightning.Trainer(callbacks=[callback])
    trainer.fit(module, loader)
    callback.report.print()

One class serves both namespaces (``lightning.pytorch`` and ``pytorch_lightning``): it derives
from the ``Callback`` of each one installed.

Lightning calls ``optimizer.step(closure)``: forward, backward, ``on_before_optimizer_step`` and
its gradient clipping run inside the step, and the watch records the step when the closure has
returned, over the gradient accumulated from every micro-batch, before the update. The loss is
the one Lightning backpropagates (``on_before_backward``; each micro-batch's is divided by
``accumulate_grad_batches``, so their sum is the step's mean). A step with a NaN/Inf is replayed
through ``training_step`` on the step's batches, so the origin is found in whatever submodules
``training_step`` calls.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from gradscope.config import Checks
from gradscope.integrations.session import Options, Session, numbers
from gradscope.locate import replay
from gradscope.locate.locating import Replay
from gradscope.report import Report, StepRecord

PREFIX = "gradscope/"  # the metric names' prefix in the module's logger


def _callback_bases() -> tuple[type, ...]:
    bases = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(package).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError(
            "gradscope.integrations.lightning needs PyTorch Lightning: pip install lightning "
            "(or pytorch_lightning), then import it again"
        )
    return tuple(bases)


class GradscopeCallback(*_callback_bases()):  # type: ignore[misc]
    """Watches the gradients of ``Trainer.fit``.

    Args:
        logdir: write a TensorBoard run there, step by step.
        raise_on: ``"error"`` (or ``"warning"``, ``"info"``): at the first step with such a finding,
            raise ``GradientAnomaly`` from inside the optimizer step, before the update; Lightning
            stops ``fit`` (its ``on_exception`` hooks run, this callback's report is kept) and raises it.
        every: measure every N-th optimizer step only.
        checks: thresholds and accepted findings, as the config's ``checks:`` section.
        json: write the report there when training ends (also when it raised).
        activations: dead/saturated unit statistics.
        locate: replay a step that shows a NaN/Inf to find where it was made.
        histograms_every: gradient histograms for TensorBoard every N steps (with ``logdir``).
        probes: optional probes by name (``gradscope.probes.OPTIONAL``), e.g. ``("update_ratio",)``.
        quiet: say nothing; otherwise each kind of warning or error is raised as a warning through
            Lightning's ``rank_zero_warn`` at the step it first appears, and a one-line summary when
            training ends (``rank_zero_warn`` when something was found, else ``rank_zero_info``).
        log: send each measured step's numbers (``gradscope/grad_norm``, ``gradscope/grad_norm/<param>``,
            ``gradscope/clip_coefficient``, ``gradscope/nonfinite_entries``, each probe's
            ``gradscope/<probe>/<param>``) to the module's logger.

    Attributes:
        report: the finished ``Report`` once training ended (None before).
    """

    def __init__(
        self,
        *,
        logdir: str | None = None,
        raise_on: str | None = None,
        every: int = 1,
        checks: Checks | dict[str, Any] | None = None,
        json: str | None = None,
        activations: bool = True,
        locate: bool = True,
        histograms_every: int = 10,
        probes: tuple[str, ...] | list[str] = (),
        quiet: bool = False,
        log: bool = True,
    ) -> None:
        super().__init__()
        options = Options.of(
            checks,
            logdir=logdir,
            raise_on=raise_on,
            every=every,
            json=json,
            activations=activations,
            locate=locate,
            histograms_every=histograms_every,
            probes=tuple(probes),
            quiet=quiet,
        )
        self._session = Session(options)
        self._log = log
        self._loss: torch.Tensor | None = None  # the step's loss so far, summed over its micro-batches
        self._batches: list[tuple[Any, int]] = []  # the step's micro-batches, for a replay
        self._state: replay.RngState | None = None  # the random state before its first micro-batch
        self._unlogged: StepRecord | None = None
        self._global_step = 0

    @property
    def report(self) -> Report | None:
        """The finished report (None until training ended)."""
        return self._session.report

    # --- Lightning's hooks ---------------------------------------------------------------------------

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = trainer.optimizers
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # "16-mixed": unscaled before clipping
        optimizer = optimizers[0] if optimizers else None
        scope = self._session.open(pl_module, optimizer, scaler, self._measured, say=_say(trainer))
        if len(optimizers) > 1:
            scope.notes.append(f"{len(optimizers)} optimizers: the steps of the first are recorded")
        self._global_step = trainer.global_step
        self._new_step()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._session.scope is None:
            return
        if not self._batches:
            self._state = replay.rng_state()
        if self._session.options.locate:
            self._batches.append((batch, batch_idx))

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        scope = self._session.scope
        if scope is None:
            return
        loss = loss.detach()
        self._loss = loss if self._loss is None else self._loss + loss
        scope.upcoming(loss=self._loss, replay=self._replay(trainer))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._global_step:
            return  # a micro-batch that accumulates: the optimizer has not stepped yet
        self._global_step = trainer.global_step
        self._new_step()
        record, self._unlogged = self._unlogged, None
        if record is not None and self._log:
            pl_module.log_dict(numbers(record, PREFIX, per_parameter=True), on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._session.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._session.close()  # Lightning raises the exception on from fit

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._session.close()

    # --- the steps -----------------------------------------------------------------------------------

    def _measured(self, record: StepRecord) -> None:
        self._unlogged = record  # self.log is not allowed inside the optimizer step: logged at batch end

    def _new_step(self) -> None:
        self._loss, self._batches, self._state = None, [], None

    def _replay(self, trainer: Any) -> Replay | None:
        """Replay the whole step: ``training_step`` on each of its micro-batches, from its random state."""
        if not self._batches or self._state is None:
            return None
        batches = list(self._batches)

        def forward() -> torch.Tensor:
            losses = [_loss_of(_training_step(trainer, batch, index)) for batch, index in batches]
            return torch.stack([loss.float() for loss in losses if loss is not None]).sum()

        return Replay(forward, self._state, replay.batch_tensors([b for b, _ in batches], None))


def _say(trainer: Any) -> Callable[[int, str], None]:
    """Lightning's own channel: ``rank_zero_warn`` for a finding (and for a summary that has one),
    ``rank_zero_info`` for a quiet summary."""
    utilities = importlib.import_module(type(trainer).__module__.rsplit(".", 2)[0] + ".utilities.rank_zero")

    def say(level: int, text: str) -> None:
        if level >= logging.WARNING:
            utilities.rank_zero_warn(text, category=GradscopeWarning)
        else:
            utilities.rank_zero_info(text)

    return say


class GradscopeWarning(UserWarning):
    """A finding gradscope says during ``fit`` (filter it with ``warnings.filterwarnings``)."""


def _training_step(trainer: Any, batch: Any, index: int) -> Any:
    """``training_step`` as Lightning calls it: under the precision's autocast, the module's hook name set."""
    call = importlib.import_module(type(trainer).__module__.rsplit(".", 2)[0] + ".trainer.call")
    return call._call_strategy_hook(trainer, "training_step", batch, index)


def _loss_of(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output.get("loss")
    return None
