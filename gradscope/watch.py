"""gradscope inside your own training loop: ``with gradscope.watch(model, optimizer=opt) as scope``.

The same probes, statistics, rules and reporters as ``gradscope inspect``; here
the user's loop drives the steps and gradscope observes them:

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
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from gradscope import __version__, distributed, replay, rules, stats
from gradscope.capture import ForwardCapture, during_forward, record_scaler_skips
from gradscope.config import Checks, ClipSpec
from gradscope.errors import GradientAnomaly
from gradscope.probes.activations import ActivationProbe
from gradscope.probes.gradients import (
    EXTRA_NORM,
    GRAD_MAX_ABS,
    GRAD_NORM,
    Fetch,
    GradientProbe,
    Readings,
    to_local,
)
from gradscope.probes.histograms import WIDTH, gradient_histograms, to_histogram
from gradscope.probes.modules import ModuleTracker
from gradscope.report import SEVERITIES, BackwardFailure, NonfiniteOrigin, Report, RunInfo, StepRecord


@dataclass(frozen=True)
class Replay:
    """How to replay a whole step (model and loss) when it shows a NaN/Inf: the driver knows."""

    forward: Callable[[], torch.Tensor]
    state: replay.RngState
    inputs: dict[str, torch.Tensor]


class Watch:
    """Observes a model's training steps. Use through ``gradscope.watch``; see its arguments."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: torch.amp.GradScaler | None = None,
        logdir: str | None = None,
        raise_on: str | None = None,
        checks: Checks | None = None,
        activations: bool = True,
        locate: bool = True,
        histograms_every: int = 10,
        clip: ClipSpec | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
        recorded_before_clipping: bool = False,
        plot: str | None = None,
        every: int = 1,
        ranks: distributed.Ranks | None = None,
    ) -> None:
        if raise_on is not None and raise_on not in SEVERITIES:
            raise ValueError(f"raise_on must be one of {', '.join(SEVERITIES)} or None, got {raise_on!r}")
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.ranks = ranks if ranks is not None else distributed.joined(model)
        # DDP's module: its names are the report's, the hooks watch it and replays run on it locally.
        self.probe_model = inner = distributed.unwrap(model)
        self._shards = self.ranks if self.ranks is not None and self.ranks.sharded else None  # FSDP
        self.raise_on, self.checks, self.locate = raise_on, checks or Checks(), locate
        self.histograms_every = histograms_every if logdir or on_step else 0
        self.clip, self.on_step = clip, on_step
        if every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.every = every
        self._seen = 0  # training steps so far, measured or not
        # A driver that calls step() before clipping (the CLI) needs no norms at the end of backward.
        self._norms_at_backward_end = not recorded_before_clipping
        self.notes: list[str] = []
        if _is_compiled(inner) and activations:
            activations = False
            self.notes.append(
                "torch.compile'd model: activation statistics and NaN replays are off (global module hooks "
                "and a TorchFunctionMode would force graph breaks); gradient statistics work as usual"
            )
        extra = clip.norm_type if clip is not None and clip.norm_type not in (2.0, math.inf) else None
        # A compiled model shares its parameters with the module it wraps: report them by their own names.
        self.probe = GradientProbe(getattr(inner, "_orig_mod", inner), extra_norm=extra, shards=self._shards)
        self.trainable = [info for info in self.probe.infos if info.trainable]
        self.tracker = ModuleTracker(inner) if activations else None
        self.activations = ActivationProbe(self.tracker) if self.tracker is not None else None
        if self.activations is not None and self.ranks is not None:
            self.activations.per_unit = True
        self.steps: list[StepRecord] = []
        self.called: tuple[str, ...] | None = None
        self.located = False
        leader = self.ranks is None or self.ranks.rank == 0  # one rank writes the outputs
        self._logdir, self._plot = (logdir, plot) if leader else (None, None)
        self._reporter: Any = None
        self._pre: tuple[list[int], torch.Tensor] | None = None  # norms at the end of the last backward
        self._recorded = False  # this step is recorded already (by step()); the optimizer hook skips it
        self._capture = ForwardCapture(inner) if locate and not _is_compiled(inner) else None
        self._stack = contextlib.ExitStack()
        self._activation_stack = contextlib.ExitStack()  # the mode and module hooks behind activation statistics

    # --- the with block ------------------------------------------------------------------------

    def __enter__(self) -> Watch:
        try:
            self._stack.enter_context(self.probe)
            if self._norms_at_backward_end:
                self.probe.on_backward_end = self._backward_end
            if self.optimizer is not None:
                self._hook(self.optimizer.register_step_pre_hook(self._before_optimizer_step))
                self._hook(self.optimizer.register_step_post_hook(self._after_optimizer_step))
            if self.scaler is not None and self.optimizer is not None:
                self._stack.enter_context(record_scaler_skips(self.scaler, self))
            if self.ranks is not None and self.ranks.strategy == "ddp":
                self._watch_ranks_gradients()
            if self._capture is not None:
                self._stack.enter_context(self._capture)
            if self.tracker is not None and self.activations is not None:
                self._stack.enter_context(self._activation_stack)
                self._activation_stack.enter_context(self.tracker)
                self._activation_stack.enter_context(during_forward(self.probe_model, self.activations))
            if self._logdir:
                from gradscope.reporters.tensorboard import TensorBoardReporter

                self._reporter = TensorBoardReporter(self._logdir)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._stack.close()  # every hook and mode comes off, also when the loop raised
        finally:
            reporters = [r for r in (self._reporter, _plotter(self._plot)) if r is not None]
            if reporters:
                report = self.report
                for reporter in reporters:
                    reporter.write(report)
                    reporter.close()

    def _hook(self, handle: Any) -> None:
        self._stack.callback(handle.remove)

    def _watch_ranks_gradients(self) -> None:
        assert self.ranks is not None
        if not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return
        local = distributed.LocalGradients.attach(self.model, self.probe.params)
        if local is None:
            self.notes.append("the DDP model has a comm hook of its own: each rank's own gradients are not seen")
            return
        self.ranks.local = local
        self._stack.callback(setattr, local, "active", False)

    # --- steps ----------------------------------------------------------------------------------

    def step(self, loss: torch.Tensor | None = None, **extra: Any) -> StepRecord | None:
        """Record a step now: call after ``backward()`` (and after ``scaler.unscale_(optimizer)``
        when a grad scaler is given), before the weights change. Needed without an optimizer; with
        one, it records the step before clipping (and ``optimizer.step()`` then adds nothing).

        Args:
            loss: the step's loss (recorded; a non-finite loss is located).
            extra: ``replay=Replay(...)`` to replay the whole step (model and loss) when it shows a
                NaN/Inf; other ``StepRecord`` fields to record with it (``underflow=...``).

        Returns:
            The step's record, or None on a step that ``every`` leaves out.
        """
        record = self._finish(loss=loss, **extra) if self._measured_now() else self._pass()
        self._recorded = True
        if self.optimizer is None:
            self.probe.mark_step()
            self._recorded = False
        return record

    def record_failure(self, loss: float, failure: BackwardFailure) -> StepRecord:
        """Record a step whose backward raised."""
        return self._append(StepRecord(self._seen, loss, math.nan, {}, {}, backward_error=failure))

    def _before_optimizer_step(self, *_: Any) -> None:
        if not self._recorded:
            if self._measured_now():
                self._finish(loss=None)  # a step pre-hook must return None
            else:
                self._pass()

    def _measured_now(self) -> bool:
        return self._seen % self.every == 0

    def _pass(self) -> None:
        """A step that ``every`` leaves out: nothing measured, nothing fetched."""
        self._seen += 1
        self._early_reset()
        self._pause_for_next()
        return None

    def _early_reset(self) -> None:
        self._pre = None
        self.probe.begin_step()
        if self.activations is not None and self.tracker is not None:
            self.activations.reset()
            self.tracker.reset()

    def _hooks_instead_of_mode(self) -> None:
        """After the first step: when every activation was an activation module, hooks on those
        modules replace the mode and the global module hooks (a Python call per op and per module)."""
        assert self.activations is not None
        sites = self.activations.module_sites(self.probe_model)
        if sites is None:
            return  # F.relu and the like: only the mode sees them
        self._activation_stack.close()
        for handle in self.activations.hook(sites):
            self._activation_stack.callback(handle.remove)

    def _pause_for_next(self) -> None:
        if self.activations is not None:
            self.activations.paused = not self._measured_now()

    def _after_optimizer_step(self, *_: Any) -> None:
        self._recorded = False
        self.probe.mark_step()

    def _backward_end(self) -> None:
        if not self._measured_now():
            return
        with torch._C.DisableTorchFunction():  # gradscope's own ops bypass its activation mode
            self._pre = self.probe.grad_norms()

    def _finish(
        self, loss: torch.Tensor | None, skipped: bool = False, replay: Replay | None = None, **extra: Any
    ) -> StepRecord:
        """Measure the gradients as the optimizer will see them, fetch once, record, judge."""
        index = self._seen
        with torch._C.DisableTorchFunction():  # gradscope's own ops bypass its activation mode
            readings, values, pre, names = self._measure(index, loss)
        record = self._record(index, readings, values, pre, skipped)
        if loss is None:
            record = replace(record, loss=None)
        if names:
            rows = values["histograms"]
            found = {n: to_histogram(rows[i * WIDTH : (i + 1) * WIDTH]) for i, n in enumerate(names)}
            record = replace(record, histograms=found)
        if self.ranks is not None:
            ranks = self.ranks.rank_steps(values["ranks"], self.probe.names, loss is not None)
            losses = [r.loss for r in ranks if r.loss is not None]
            mean = math.fsum(losses) / len(losses) if losses else None  # the loss over the whole batch
            record = replace(record, ranks=ranks, loss=mean)
        if self.activations is not None:
            world = self.ranks.world if self.ranks is not None else 1
            record = replace(record, activations=self.activations.results(values["activations"], world))
        record = replace(record, origin=self._locate(record, replay), **extra)
        return self._append(record)

    def _measure(
        self, index: int, loss: torch.Tensor | None
    ) -> tuple[Readings, dict[str, list[float]], dict[int, float] | None, list[str]]:
        """Statistics on the device, fetched with everything else of the step in one transfer."""
        fetch = Fetch()
        fetch.add("loss", loss.detach().float() if loss is not None else torch.tensor(math.nan))
        pre_index, pre = self._pre if self._pre is not None else ([], torch.zeros(0))
        fetch.add("pre", pre)
        if self.scaler is not None:
            fetch.add("scale", _scale_tensor(self.scaler))
        names = self._histograms(index, fetch)
        if self.activations is not None:
            counts = self.activations.counts_of_all_ranks(self.ranks) if self.ranks else self.activations.counts
            fetch.add("activations", *([torch.stack(counts)] if counts else []))  # one tensor, not one per site
        if self.ranks is not None:
            fetch.add("ranks", self.ranks.own_views(loss))
        readings = self.probe.fetch(self.probe.measure(), fetch.tensors)
        values = fetch.split(readings.scalars)
        # Norms from the end of backward (None: none taken, the gradients are measured as they were then).
        return readings, values, dict(zip(pre_index, values["pre"])) if self._pre is not None else None, names

    def _append(self, record: StepRecord) -> StepRecord:
        self.steps.append(record)
        if self.called is None and self.tracker is not None:
            self.called = tuple(self.tracker.calls)
            self._hooks_instead_of_mode()
        self._seen += 1
        self._early_reset()
        self._pause_for_next()
        for stream in (self._reporter.on_step if self._reporter is not None else None, self.on_step):
            if stream is not None:
                stream(record)
        self._raise_if_found(record)
        return record

    def _record(
        self,
        index: int,
        readings: Readings,
        values: dict[str, list[float]],
        pre: dict[int, float] | None,
        skipped: bool,
    ) -> StepRecord:
        scale = values["scale"][0] if "scale" in values else 1.0
        post = stats.combine_norms([row[GRAD_NORM] for row in readings.rows])
        # The end-of-backward norms are before any clipping (and before unscaling, by `scale`).
        before = stats.combine_norms([pre.get(i, 0.0) / scale for i in readings.index]) if pre is not None else post
        measured = post / before if before and math.isfinite(before) else 1.0
        clipped = abs(measured - 1.0) > 1e-6  # the user's clipping ran before this record
        if clipped and measured > 0:
            # Clipping multiplied every gradient by `measured`: the true gradient is the one before.
            for row in readings.rows:
                row[GRAD_NORM] /= measured
                row[GRAD_MAX_ABS] /= measured
                if len(row) > EXTRA_NORM:
                    row[EXTRA_NORM] /= measured
        params = stats.parameter_stats(self.trainable, readings)
        total = stats.total_norm(params)
        extra: dict[str, Any] = {}
        if self.clip is not None:
            clip_norm = stats.clip_norm(readings, self.clip.norm_type)
            coefficient = measured if clipped else stats.clip_coefficient(clip_norm, self.clip.max_norm)
            extra.update(clip_norm=clip_norm, clip_coefficient=coefficient, grad_norm_total_clipped=total * coefficient)
        elif clipped:
            extra.update(clip_coefficient=measured, grad_norm_total_clipped=post)
        if self.scaler is not None:
            # The scaler skips the update exactly when an unscaled gradient is not finite.
            skipped = skipped or any(s.nan_count or s.inf_count for s in params.values())
            extra.update(loss_scale=scale, skipped=skipped)
        return StepRecord(
            step=index,
            loss=values["loss"][0],
            grad_norm_total=total,
            parameters=params,
            modules=stats.module_stats(self.trainable, params),
            stale=tuple(self.probe.names[i] for i in sorted(self.probe.stale)),
            **extra,
        )

    def _histograms(self, index: int, fetch: Fetch) -> list[str]:
        if not self.histograms_every or index % self.histograms_every:
            return []
        named = [(self.probe.names[i], self.probe.params[i].grad) for i in self.probe.arrived()]
        named = [(n, g) for n, g in named if g is not None]
        fetch.add("histograms", gradient_histograms([to_local(g) for _, g in named], self._shards))
        return [n for n, _ in named]

    def _locate(self, record: StepRecord, step_replay: Replay | None) -> NonfiniteOrigin | None:
        bad = [s for s in record.parameters.values() if s.nan_count or s.inf_count]
        loss_bad = not _finite(record.loss)
        if self.located or not self.locate or not (bad or loss_bad):
            return None
        if self._capture is None and step_replay is None:
            return None
        if record.skipped and step_replay is None and not loss_bad:
            return None  # an overflow of the scaled gradients: the scaler skipped the step; loss_scale_overflow
        if loss_bad:
            kind = "nan" if math.isnan(record.loss) else "inf"  # type: ignore[arg-type]
        else:
            kind = "nan" if any(s.nan_count for s in bad) else "inf"
        suspects = self._suspects(record)
        origin = None
        if self.ranks is None or self.ranks.sharded or self.ranks.rank in suspects:
            # FSDP replays gather parameters: every rank replays with the others.
            own_loss_bad = loss_bad if self.ranks is None else not _finite(record.ranks[self.ranks.rank].loss)
            origin = self._replay(kind, own_loss_bad, step_replay)
        if self.ranks is not None:
            rank, origin = self.ranks.first_found(origin if self.ranks.rank in suspects else None)
            origin = replace(origin, rank=rank) if origin is not None else None
        self.located = origin is not None  # one fault, one finding
        return origin

    def _replay(self, kind: str, loss_bad: bool, step_replay: Replay | None) -> NonfiniteOrigin | None:
        if self.activations is not None:
            self.activations.paused = True
        try:
            lockstep = self._shards is not None
            if step_replay is not None:
                model = self.probe_model
                return replay.locate(model, step_replay.inputs, step_replay.forward, step_replay.state, kind, lockstep)
            return self._capture.locate(kind, loss_bad, lockstep)  # type: ignore[union-attr]
        finally:
            if self.activations is not None:
                self.activations.paused = False

    def _suspects(self, record: StepRecord) -> set[int]:
        """The ranks whose own loss or gradients were not finite (all ranks when none can tell)."""
        if self.ranks is None:
            return set()
        return {r.rank for r in record.ranks if r.bad} or set(range(self.ranks.world))

    def _raise_if_found(self, record: StepRecord) -> None:
        if self.raise_on is None:
            return
        single = Report(self._run_info(), tuple(self.probe.infos), (record,), called_modules=self.called)
        found, _ = rules.diagnose(single, self.checks)
        worst = [a for a in found if SEVERITIES.index(a.severity) >= SEVERITIES.index(self.raise_on)]
        if worst:
            raise GradientAnomaly(worst[0])

    # --- the report -----------------------------------------------------------------------------

    @property
    def report(self) -> Report:
        """Everything recorded so far, with the anomalies the rules find in it."""
        report = Report(self._run_info(), tuple(self.probe.infos), tuple(self.steps), called_modules=self.called)
        anomalies, ignored = rules.diagnose(report, self.checks)
        return replace(report, anomalies=anomalies, ignored=ignored)

    def _run_info(self) -> RunInfo:
        param = next(self.model.parameters(), None)
        precision = self._capture.precision if self._capture is not None else "unknown"
        return RunInfo(
            model=distributed.model_name(getattr(self.probe_model, "_orig_mod", self.probe_model)),
            device=str(param.device) if param is not None else "cpu",
            precision=precision,
            steps_requested=len(self.steps),
            steps_completed=len(self.steps),
            parameters_total=sum(i.numel for i in self.probe.infos),
            parameters_trainable=sum(i.numel for i in self.trainable),
            optimizer=type(self.optimizer).__name__.lower() if self.optimizer is not None else None,
            torch_version=torch.__version__,
            gradscope_version=__version__,
            notes=tuple(self.notes),
            distributed=self.ranks.describe() if self.ranks is not None else None,
        )


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    logdir: str | None = None,
    raise_on: str | None = None,
    checks: Checks | dict[str, Any] | None = None,
    activations: bool = True,
    locate: bool = True,
    histograms_every: int = 10,
    plot: str | None = None,
    every: int = 1,
) -> Watch:
    """Watch ``model``'s gradients in your own training loop.

    Args:
        model: the model being trained; left as it was when the block exits.
        optimizer: steps are recorded at each ``optimizer.step()`` (through a step pre-hook).
            Without one, call ``scope.step(loss)`` after ``backward()``.
        scaler: your ``torch.amp.GradScaler``, so gradients are reported unscaled and steps it
            skips are recorded as skipped.
        logdir: write a TensorBoard run there, step by step.
        raise_on: ``"error"`` (or ``"warning"``, ``"info"``): raise ``GradientAnomaly`` at the first
            step with such a finding, before the optimizer updates the weights.
        checks: thresholds and accepted findings, as the config's ``checks:`` section.
        activations: dead/saturated unit statistics (a TorchFunctionMode over the block).
        locate: keep the model's last forward call to replay a step that shows a NaN/Inf.
        histograms_every: gradient histograms for TensorBoard every N steps.
        plot: save the gradient-flow picture there when the block exits (needs matplotlib).
        every: measure every N-th step only (the others cost nothing); 1 measures every step.

    Returns:
        A ``Watch``: use as ``with gradscope.watch(...) as scope``; ``scope.report`` afterwards.
    """
    if isinstance(checks, dict):
        checks = Checks.model_validate(checks)
    return Watch(
        model,
        optimizer,
        scaler,
        logdir,
        raise_on,
        checks,
        activations,
        locate,
        histograms_every,
        plot=plot,
        every=every,
    )


def _plotter(path: str | None) -> Any:
    if path is None:
        return None
    from gradscope.reporters.plot import PlotReporter

    return PlotReporter(path)


def _scale_tensor(scaler: torch.amp.GradScaler) -> torch.Tensor:
    # get_scale() would sync the host; the scale tensor joins the step's one transfer instead.
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, torch.Tensor) else torch.tensor(scaler.get_scale())


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule"
