"""gradscope inside the Hugging Face ``Trainer``::

    from gradscope.integrations.transformers import GradscopeCallback

    callback = GradscopeCallback(json="grads.json", raise_on="error")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    callback.report.print()

The Trainer clips (``max_grad_norm``) and then calls ``on_pre_optimizer_step``, where the step is
recorded over the gradient accumulated from its micro-batches; the norms taken at the end of each
backward give the unclipped gradient and the clip factor, so ``gradscope/grad_norm`` equals the
Trainer's own ``grad_norm``. accelerate's optimizer wrapper (and its grad scaler) is unwrapped.
The loss is the model's (``outputs["loss"]``, as ``Trainer.compute_loss`` takes it), combined over
the micro-batches as the Trainer does: summed when the model was given ``num_items_in_batch``
(its loss is already a share of the whole batch), else averaged.

The Trainer has no hook for an exception: an error raised outside gradscope (a crash in the
model) leaves the hooks on until ``callback.close()``, or use ``with callback: trainer.train()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradscope.config import Checks
from gradscope.errors import GradientAnomaly
from gradscope.integrations.session import Options, Session, numbers
from gradscope.report import Report, StepRecord

try:
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging
except ImportError as exc:
    raise ImportError(
        "gradscope.integrations.transformers needs Hugging Face transformers: pip install transformers accelerate"
    ) from exc

PREFIX = "gradscope/"  # beside the Trainer's own "grad_norm" in its logs
LOGGER = hf_logging.get_logger(__name__)  # the Trainer's convention: a module logger through transformers' logging


class GradscopeCallback(TrainerCallback):
    """Watches the gradients of ``Trainer.train``.

    Args:
        logdir: write a TensorBoard run there, step by step.
        raise_on: ``"error"`` (or ``"warning"``, ``"info"``): at the first step with such a finding,
            raise ``GradientAnomaly`` from ``on_pre_optimizer_step``, before the update; the hooks come
            off and the report is kept (and written to ``json``) first, then ``train`` raises it.
        every: measure every N-th optimizer step only.
        checks: thresholds and accepted findings, as the config's ``checks:`` section.
        json: write the report there when training ends (also when gradscope stopped it).
        activations: dead/saturated unit statistics.
        locate: replay a step that shows a NaN/Inf to find where it was made.
        histograms_every: gradient histograms for TensorBoard every N steps (with ``logdir``).
        probes: optional probes by name (``gradscope.probes.OPTIONAL``), e.g. ``("update_ratio",)``.
        quiet: say nothing; otherwise each kind of warning or error goes to this module's
            transformers logger (``transformers.utils.logging``) at the step it first appears, and a
            one-line summary when training ends: on the main process only, and at or above the
            Trainer's log level (``TrainingArguments.log_level``, else transformers' verbosity), as the
            Trainer logs.
        log: add each logged step's numbers to the Trainer's logs (``gradscope/grad_norm``,
            ``gradscope/clip_coefficient``, ``gradscope/nonfinite_entries``): ``log_history`` and the
            ``on_log`` of the callbacks after this one.

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
        self._losses: list[tuple[torch.Tensor, bool]] = []  # (loss, already a share of the step) per micro-batch
        self._loss_hook: Any = None
        self._unlogged: StepRecord | None = None

    @property
    def report(self) -> Report | None:
        """The finished report (None until training ended)."""
        return self._session.report

    def close(self) -> Report | None:
        """Take every hook off and keep the report (training ended without the Trainer saying so)."""
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        return self._session.close()

    def __enter__(self) -> GradscopeCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the Trainer's hooks -------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module = None, **kwargs: Any) -> None:
        self.close()
        say = _say(args) if state.is_world_process_zero else None
        self._session.open(model, kwargs.get("optimizer"), None, self._measured, say=say)  # scaler: the wrapper's
        self._loss_hook = model.register_forward_hook(self._model_loss, with_kwargs=True)
        self._losses = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        scope = self._session.scope
        if scope is None:
            return
        loss = self._step_loss()
        try:
            scope.step(loss)  # after the Trainer's clipping, before the update
        except GradientAnomaly:
            self.close()
            control.should_training_stop = True
            raise

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        record, self._unlogged = self._unlogged, None
        if record is None or logs is None or not self._log or "loss" not in logs:
            return
        found = numbers(record, PREFIX, per_parameter=False)
        logs.update(found)
        if state.log_history:
            state.log_history[-1].update(found)  # the Trainer stored a copy before calling on_log

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    # --- the steps -----------------------------------------------------------------------------------

    def _measured(self, record: StepRecord) -> None:
        self._unlogged = record

    def _model_loss(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not (torch.is_grad_enabled() and module.training):
            return  # evaluation and prediction
        loss = output.get("loss") if isinstance(output, dict) else output[0] if isinstance(output, tuple) else None
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append((loss.detach().reshape(()), "num_items_in_batch" in kwargs))

    def _step_loss(self) -> torch.Tensor | None:
        """The step's loss as the Trainer counts it (its ``tr_loss``), with no host sync."""
        losses, self._losses = self._losses, []
        if not losses:
            return None
        total = torch.stack([loss.float() for loss, _ in losses]).sum()
        return total if all(share for _, share in losses) else total / len(losses)


def _say(args: Any) -> Callable[[int, str], None]:
    """The Trainer's convention: what its log level for this process lets through (``log_level``, else
    transformers' verbosity, read when said), on this module's logger."""

    threshold = getattr(args, "get_process_log_level", hf_logging.get_verbosity)

    def say(level: int, text: str) -> None:
        if level >= threshold():
            LOGGER.log(level, text)

    return say
