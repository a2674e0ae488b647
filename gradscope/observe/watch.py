"""gradscope inside your own training loop: ``with gradscope.watch(model, optimizer=opt) as scope``.

The same probes, statistics, rules and reporters as ``gradscope inspect``; here
the user's loop drives the steps and gradscope observes them:

- each ``backward()`` hands the watch its loss (``backwards``), so every step's loss is known
  without ``scope.step(loss)``;
- each backward ends with a callback that takes every gradient's L2 norm on the
  device (before any clipping, and before unscaling when a grad scaler is given);
- at the optimizer step (a step pre-hook), or at ``scope.step()`` without an
  optimizer, the full statistics are taken and fetched in one host transfer;
  the norms taken at the end of backward give the true (unclipped) norms and
  the clip coefficient the user's clipping applied;
- a step with a NaN/Inf is replayed from the model's last forward call (its
  inputs, random state and autocast are kept) to find where the NaN was made,
  before the weights change.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import nn

from gradscope.config import Checks, ClipSpec
from gradscope.config.outputs import Outputs
from gradscope.errors import GradientAnomaly
from gradscope.locate.capture import ForwardCapture, PrecisionSeen, record_scaler_skips
from gradscope.locate.locating import OriginSearch, Replay
from gradscope.locate.loss_ops import LossOps
from gradscope.observe import distributed
from gradscope.observe.backwards import Backwards
from gradscope.observe.history import History, Retention
from gradscope.observe.optimizer_hooks import StepHooks
from gradscope.observe.runs import ReportCache, judged, learning_rate, run_info
from gradscope.probes import optional
from gradscope.probes.activation_counts import ActivationCounts
from gradscope.probes.base import Probe, StepContext, Watched
from gradscope.probes.gradients import GradientProbe
from gradscope.probes.histograms import HistogramProbe
from gradscope.probes.loop import LoopProbe
from gradscope.probes.memory import MemoryOptions
from gradscope.probes.ranks import RankViews
from gradscope.probes.recording import Recorder
from gradscope.report import SEVERITIES, Anomaly, BackwardFailure, LoopFacts, Report, RunInfo, StepRecord
from gradscope.rules.step_judge import StepJudge
from gradscope.utils import outfiles
from gradscope.utils.wrappers import is_compiled, unwrap, unwrap_optimizer

__all__ = ["Replay", "Watch"]

COMPILED_NOTE = (
    "torch.compile'd model: activation statistics are off (global module hooks and a TorchFunctionMode "
    "would force graph breaks); a step with a NaN/Inf is replayed through the eager original"
)


class Reporting(Protocol):
    """The reporters of a watched run (``gradscope.reporters.Reporters``): they see each step and the report."""

    listening: bool  # some reporter takes each step's findings (``found``) as they appear

    def __len__(self) -> int: ...

    def on_step(self, step: StepRecord) -> None: ...

    def found(self, findings: list[Anomaly]) -> None: ...

    def write(self, report: Report) -> None: ...


class Watch:
    """Observes a model's training steps. Use through ``gradscope.watch``; see its arguments.

    ``reporters`` makes, on entry, what writes ``outputs`` (``gradscope.reporters.build_reporters``):
    the watch itself knows no reporter.

    The gradient probe is the one every step needs; the other probes (``probes``) share the
    ``Probe`` interface and the watch only loops over them.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: torch.amp.GradScaler | None = None,
        *,
        outputs: Outputs | None = None,
        reporters: Callable[[Outputs, int | None], Reporting] | None = None,
        raise_on: str | None = None,
        checks: Checks | None = None,
        activations: bool = True,
        locate: bool = True,
        histograms_every: int = 10,
        clip: ClipSpec | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
        recorded_before_clipping: bool = False,
        every: int = 1,
        ranks: distributed.Ranks | None = None,
        probes: tuple[str, ...] | list[str] = (),
        retention: Retention | None = None,
        memory: bool | MemoryOptions = False,
        loop: bool = True,
    ) -> None:
        if raise_on is not None and raise_on not in SEVERITIES:
            raise ValueError(f"raise_on must be one of {', '.join(SEVERITIES)} or None, got {raise_on!r}")
        if every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        # accelerate's AcceleratedOptimizer (and its scaler), Lightning's LightningOptimizer: the torch optimizer inside.
        optimizer, wrapper_scaler = unwrap_optimizer(optimizer)
        scaler = scaler if scaler is not None else wrapper_scaler
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.ranks = ranks if ranks is not None else distributed.joined(model)
        # DDP's module: its names are the report's, the hooks watch it and replays run on it locally.
        self.probe_model = inner = unwrap(model)
        self._shards = self.ranks if self.ranks is not None and self.ranks.sharded else None  # FSDP
        self.raise_on, self.checks = raise_on, checks or Checks()
        self.on_step, self.every = on_step, every
        self._seen = 0  # training steps so far, measured or not
        # A driver that calls step() before clipping (the CLI) needs no norms at the end of backward.
        self._norms_at_backward_end = not recorded_before_clipping
        self.notes: list[str] = []
        if is_compiled(inner) and activations:
            activations = False
            self.notes.append(COMPILED_NOTE)
        extra = clip.norm_type if clip is not None and clip.norm_type not in (2.0, math.inf) else None
        # A compiled model shares its parameters with the module it wraps: report them by their own names.
        self.gradients = GradientProbe(unwrap(inner, compiled=True), extra_norm=extra, shards=self._shards)
        self.recorder = Recorder(self.gradients, clip, scaler)
        self.activations = ActivationCounts(inner, self.ranks) if activations else None
        self.tracker = self.activations.tracker if self.activations is not None else None
        self.outputs = outputs or Outputs()
        self._memory = memory if isinstance(memory, MemoryOptions) else None
        probes = [*probes, "memory"] if memory and "memory" not in probes else probes
        # The user's loop around the gradients (a driver of its own, the CLI, has no such bugs to find).
        self.loop = LoopProbe(unwrap(inner, compiled=True), self.gradients, optimizer) if loop else None
        self.backwards = Backwards(scaler)  # the loss of each backward() the loop runs
        # The loss code's ops, for a NaN the user's loss makes (off where a mode would break a compiled graph).
        self.loss_ops = LossOps(inner, _names(inner)) if locate and loop and not is_compiled(inner) else None
        if self.loss_ops is not None:
            self.backwards.starting.append(self.loss_ops.close)
            self.backwards.calling.append(self.loss_ops.leave_if_innermost)
        self.probes = self._probes(histograms_every if self.outputs.logdir or on_step else 0, probes)
        capture = ForwardCapture(inner) if locate else None
        self.search = OriginSearch(inner, capture, self.ranks, self._pause, enabled=locate, notes=self.notes)
        self.precision = PrecisionSeen(inner)
        self.judge = StepJudge(self.checks, self._single)
        self.history = History(retention, lambda record: self.judge.has_finding(record, self.history))
        self._make_reporters = reporters
        self.reporters: Reporting | None = None  # made on entry (the maker decides which rank writes)
        self._pre: tuple[list[int], torch.Tensor] | None = None  # norms at the end of the last backward
        self.hooks = StepHooks(self._record_now, self._after_optimizer_step, self._before_recorded_update)
        self._listening = False  # a reporter takes each step's findings as they appear (set on entry)
        self._updates = 0  # optimizer steps taken (a grad scaler skips some)
        self._stack = contextlib.ExitStack()
        self._report = ReportCache()
        self._infos = tuple(self.gradients.infos)
        self._step_run: tuple[tuple[Any, ...], RunInfo] | None = None  # see _single

    def _probes(self, histograms_every: int, named: tuple[str, ...] | list[str]) -> list[Probe]:
        """The probes besides the gradient probe, in the order they measure (the same on every rank):
        the watch's own, then the optional ones ``named``."""
        probes: list[Probe] = [self.loop] if self.loop is not None else []
        if histograms_every:
            probes.append(HistogramProbe(self.gradients, histograms_every, self._shards))
        if self.activations is not None:
            probes.append(self.activations)
        if self.ranks is not None:
            probes.append(RankViews(self.ranks, self.model, self.gradients.params, self.gradients.names, self.notes))
        watched = Watched(self.probe_model, self.gradients, self.ranks, self._shards, self.optimizer, self._memory)
        probes += optional(named, watched)
        # Last: its forward hook pushes its mode after the activation mode's hook has popped its own.
        return probes + ([self.loss_ops] if self.loss_ops is not None else [])

    @property
    def called(self) -> tuple[str, ...] | None:
        """The modules the first measured step called (None: not tracked)."""
        return self.activations.called if self.activations is not None else None

    # --- the with block ------------------------------------------------------------------------

    def __enter__(self) -> Watch:
        try:
            self.backwards.attach(self._stack)
            self._stack.enter_context(self.gradients)
            if self._norms_at_backward_end:
                self.gradients.on_backward_end = self._backward_end
            if self.optimizer is not None:
                self.hooks.attach(self.optimizer, self._stack)
            if self.scaler is not None and self.optimizer is not None:
                skips = record_scaler_skips(self.scaler, self.optimizer, lambda: self._updates, self._skipped)
                self._stack.enter_context(skips)
            if self.search.capture is not None:
                self._stack.enter_context(self.search.capture)
            if not is_compiled(self.probe_model):  # hooks inside a compiled graph would break it
                self._stack.enter_context(self.precision)
            for probe in self.probes:
                self._stack.callback(probe.detach)
                probe.attach()
            o = self.outputs  # checked now, not at the end of a long run
            outfiles.check_files({"json=": o.json, "jsonl=": o.jsonl, "plot=": o.plot})
            if self._make_reporters is not None:
                self.reporters = self._make_reporters(o, self.ranks.rank if self.ranks is not None else None)
                self._listening = self.reporters.listening
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._stack.close()  # every hook and mode comes off, also when the loop raised
            if self.loop is not None:
                self.loop.settle()
        finally:
            if self.reporters:
                self.reporters.write(self.report)

    def _pause(self, paused: bool) -> None:
        self.backwards.paused = paused
        for probe in self.probes:
            probe.pause(paused)

    @contextlib.contextmanager
    def forward_window(self, inputs: Any = None) -> Iterator[None]:
        """Enter around a driver's forward and loss on ``inputs`` (the batch): the probes that
        measure one forward (the memory ledger) measure this one."""
        with contextlib.ExitStack() as stack:
            for probe in self.probes:
                stack.enter_context(probe.forward_window(inputs))
            yield

    def report_fields(self) -> dict[str, Any]:
        """The run-level ``Report`` fields the probes give (``memory``)."""
        fields: dict[str, Any] = {}
        for probe in self.probes:
            fields.update(probe.report_fields())
        return fields

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The probes do not see the block: a replay gradscope runs of its own."""
        self._pause(True)
        try:
            yield
        finally:
            self._pause(False)

    # --- steps ----------------------------------------------------------------------------------

    def step(self, loss: torch.Tensor | None = None, **extra: Any) -> StepRecord | None:
        """Record a step now. The rule: call it after ``backward()`` and after any clipping (and
        ``scaler.unscale_(optimizer)``), before ``optimizer.step()``. Needed only without an
        optimizer; with one, ``optimizer.step()`` records the step and the loss is the one
        ``backward()`` was called on (``optimizer.step()`` then adds nothing).

        Args:
            loss: the step's loss, when it is not what ``backward()`` was called on (None: the
                observed one); a non-finite loss is located.
            extra: ``replay=Replay(...)`` to replay the whole step (model and loss) when it shows a
                NaN/Inf; other ``StepRecord`` fields to record with it (``underflow=...``).

        Returns:
            The step's record, or None on a step that ``every`` leaves out.
        """
        record = self._finish(loss=loss, **extra) if self._measured_now() else self._pass()
        self.hooks.recorded = True
        if self.optimizer is None:
            self.gradients.mark_step()
            self.hooks.recorded = False
        return record

    def record_failure(self, loss: float, failure: BackwardFailure) -> StepRecord:
        """Record a step whose backward raised."""
        return self._append(StepRecord(self._seen, loss, math.nan, {}, {}, backward_error=failure))

    def upcoming(self, loss: torch.Tensor | None = None, replay: Replay | None = None) -> None:
        """Hand over the loss (and a replay) of the step the optimizer hook records next: for a
        driver whose trainer calls ``optimizer.step()`` itself (the Lightning and Hugging Face callbacks)."""
        self.hooks.upcoming(loss, replay)

    def _record_now(self, loss: torch.Tensor | None, replay: Replay | None) -> None:
        if self._measured_now():
            self._finish(loss=loss, replay=replay)
        else:
            self._pass()

    def _skipped(self) -> None:
        """The grad scaler skipped the optimizer step, so no pre-hook recorded it (nor will a post-hook
        end it): record it, unless ``step()`` did already."""
        if self.hooks.recorded:
            self._end_step()
            return
        self._finish(loss=None, skipped=True)

    def _measured_now(self) -> bool:
        return self._seen % self.every == 0

    def _pass(self) -> None:
        """A step that ``every`` leaves out: nothing measured, nothing fetched."""
        self._next_step()
        return None

    def _next_step(self) -> None:
        self._seen += 1
        self._pre = None
        self.backwards.take()  # a step left out by `every` forgets its loss too
        self.gradients.begin_step()
        measured = self._measured_now()
        for probe in self.probes:
            probe.begin_step(measured)

    def _before_recorded_update(self) -> None:
        if self.loop is not None:
            self.loop.before_update()

    def _after_optimizer_step(self, *_: Any) -> None:
        self._updates += 1
        if self.loop is not None:
            self.loop.updated()
        self._end_step()

    def _end_step(self) -> None:
        self.hooks.recorded = False
        self.gradients.mark_step()

    def _backward_end(self) -> None:
        if not self._measured_now():
            return
        with torch._C.DisableTorchFunction():  # gradscope's own ops bypass its activation mode
            self._pre = self.gradients.grad_norms()

    def _finish(
        self, loss: torch.Tensor | None, skipped: bool = False, replay: Replay | None = None, **extra: Any
    ) -> StepRecord:
        """Measure the gradients as the optimizer will see them, fetch once, record, judge."""
        observed = self.backwards.take()
        loss = loss if loss is not None else observed
        with torch._C.DisableTorchFunction():  # gradscope's own ops bypass its activation mode
            record = self.recorder.measure(StepContext(self._seen, loss), self.probes, self._pre, skipped)
        origin = self.search.find(record, replay)
        if origin is not None and origin.phase == "loss" and origin.op is None and self.loss_ops is not None:
            origin = self.loss_ops.found or origin  # made after the model: the loss code's op (or its input)
        overflow = self.search.find_overflow(record, replay) if origin is None else None
        record = replace(record, origin=origin, overflow=overflow, **extra)
        return self._append(record)

    def _append(self, record: StepRecord) -> StepRecord:
        # raise_on judges a spike against the steps before this one: before it joins them.
        judged = self.raise_on is not None or self._listening
        spikes = self.judge.spikes(record, self.history) if judged else []
        self.history.add(record)
        self.precision.settle()
        for probe in self.probes:
            probe.step_done(record)
        self._next_step()
        if self.reporters is not None:
            self.reporters.on_step(record)
            if self._listening:
                loop = self._loop_facts()
                self.reporters.found(self.judge.settled(record, spikes) + self.judge.of_loop(record, loop))
        if self.on_step is not None:
            self.on_step(record)
        self._raise_if_found(record, spikes)
        return record

    @property
    def steps(self) -> tuple[StepRecord, ...]:
        """The steps kept in full (see ``history.Retention``), in order."""
        return self.history.steps()

    def _single(self, record: StepRecord) -> Report:
        """The report of one step alone, for the rules that judge a step by itself."""
        key = (len(self.notes), self.precision.name, learning_rate(self.optimizer), self.recorder.seen.spec)
        if self._step_run is None or self._step_run[0] != key:
            # Built once per change, not at every step; the loop rules judge the whole run, not a step.
            self._step_run = (key, replace(self._run_info(), loop=None))
        return Report(self._step_run[1], self._infos, (record,), called_modules=self.called)

    def _raise_if_found(self, record: StepRecord, spikes: list[Anomaly]) -> None:
        worst = self.judge.worst(record, self.raise_on, spikes) if self.raise_on is not None else None
        if worst is not None:
            raise GradientAnomaly(worst)

    # --- the report -----------------------------------------------------------------------------

    @property
    def report(self) -> Report:
        """Everything recorded so far, with the anomalies the rules find in it (judged once per change)."""
        stepped = bool(getattr(self.optimizer, "state", None))  # the memory ledger counts the optimizer's state
        key = (len(self.history), len(self.notes), self.precision.name, self.recorder.seen.spec, stepped)
        key = (*key, self._loop_facts())
        return self._report.get(key, self._judged)

    def _judged(self) -> Report:
        infos = tuple(self.gradients.infos)
        report = Report(
            self._run_info(), infos, self.history.steps(), called_modules=self.called, **self.report_fields()
        )
        return judged(replace(report, retained=self.history.retained()), self.checks)

    def _loop_facts(self) -> LoopFacts | None:
        return self.loop.with_backwards(self.backwards.count) if self.loop is not None else None

    def _run_info(self) -> RunInfo:
        param = next(self.model.parameters(), None)
        clip = self.recorder.clip or self.recorder.seen.spec  # the driver's, or the user's as the steps show it
        return run_info(
            self.model,
            self.gradients.infos,
            len(self.history),
            self.ranks,
            device=str(param.device) if param is not None else "cpu",
            precision=self.precision.name,
            steps_requested=len(self.history),
            optimizer=type(self.optimizer).__name__.lower() if self.optimizer is not None else None,
            lr=learning_rate(self.optimizer),
            clip=clip.model_dump() if clip is not None else None,
            notes=tuple(self.notes),
            loop=self._loop_facts(),
        )


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}
