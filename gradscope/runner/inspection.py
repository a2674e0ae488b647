"""One inspection: build what the config describes, run the instrumented steps, make the report.

The report keeps what was measured whatever happens: ``Inspection.report()``
after an interrupt or an error holds the steps completed before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradscope.config import Settings, load_config, settings_from_dict
from gradscope.errors import ConfigError, GradscopeError, ModelError, RankFailure, peer_failed
from gradscope.observe import distributed
from gradscope.observe.history import Retention
from gradscope.observe.runs import ReportCache, judged, nonfinite_parameters, run_info
from gradscope.probes.gradients import describe_parameters
from gradscope.probes.memory import MemoryOptions
from gradscope.probes.memory_facts import named_candidates
from gradscope.report import ParamInfo, Report, RunInfo, StepRecord
from gradscope.runner import fit, loading, parallel
from gradscope.runner.checkpointing import checkpointing
from gradscope.runner.engine import Engine, StepPlan
from gradscope.utils.tensors import tensors_in
from gradscope.utils.wrappers import unwrap


class Inspection:
    """A gradscope run of one config.

    Args:
        settings: a validated config.
        baseline: a saved report of the same config; gradient norms that moved from it are findings.

    Raises:
        GradscopeError: building the device, model, batch, loss or optimizer failed.
    """

    def __init__(self, settings: Settings, baseline: Report | None = None) -> None:
        self.settings = settings
        self.baseline = baseline
        self._report = ReportCache()
        self.status = "not started"
        self.error: str | None = None
        self.nonfinite: tuple[str, ...] = ()  # a failed run: parameters holding NaN/Inf when it raised
        self.checkpointed: list[str] = []
        self._duration = 0.0
        self.engine: Engine | None = None
        self.ranks: distributed.Ranks | None = None
        with _located(settings):
            self.device = loading.resolve_device(settings.device)
            spec = settings.distributed
            if spec.strategy != "none":
                self.ranks = distributed.start(spec.strategy, self.device, spec.timeout_s)
                self.device = self.ranks.device
            try:
                self._build()
            except BaseException:
                self.close()
                raise

    def _build(self) -> None:
        settings = self.settings
        self.model = loading.build_model(settings).to(self.device)  # the user's module
        named_candidates(self.model, settings.memory.candidates)  # a name matching no module: an error now
        self.trained = parallel.wrap(self.model, self.ranks) if self.ranks is not None else self.model
        self.batch = self._rank_batch(loading.build_batch(settings)).to(self.device)
        self.loss_fn = loading.build_loss(settings)
        trainable = [p for p in self.trained.parameters() if p.requires_grad]
        self.optimizer = loading.build_optimizer(settings, trainable)

    def _rank_batch(self, batch: loading.Batch) -> loading.Batch:
        """Distributed: this rank's slice of the batch (the ranks' slices make up the whole batch)."""
        if self.ranks is None:
            return batch
        rows = _rows(batch)
        world = self.ranks.world
        if rows % world:
            raise ConfigError(
                [("data.batch_size", f"the batch ({rows} rows) must split evenly over {world} ranks, got {rows}")]
            )
        rank = self.ranks.rank
        return loading.Batch(
            parallel.shard(batch.inputs, rank, world, rows), parallel.shard(batch.labels, rank, world, rows)
        )

    def close(self) -> None:
        """Leave the process group gradscope joined (distributed runs); nothing otherwise."""
        if self.ranks is not None:
            self.ranks.close()

    def run(self, on_step: Callable[[StepRecord], None] | None = None) -> Report:
        """Run every step; the report of the completed run.

        Args:
            on_step: called with each step's record as soon as it is measured.

        Raises:
            GradscopeError: user code raised, or the loss is not usable; the
                steps before it stay in ``report()``.
            KeyboardInterrupt: likewise.
        """
        settings = self.settings
        tensorboard = settings.tensorboard
        plan = StepPlan(
            self.device,
            settings.precision,
            settings.clip,
            settings.loss.name == "output",
            gradcheck=settings.gradcheck,
            histograms_every=tensorboard.histograms_every if tensorboard.logdir else 0,
            every=settings.every,
            scaler=settings.uses_scaler,
            probes=tuple(settings.probes),
            memory=_memory_options(settings),
        )
        start = time.perf_counter()
        self.status = "running"
        try:
            # The config asks for its number of steps: the report keeps every one in full.
            keep_all = Retention(first=settings.steps)
            self.engine = Engine(self.trained, self.optimizer, self.loss_fn, plan, on_step, self.ranks, keep_all)
            with (
                _located(settings),
                checkpointing(self.model, _patterns(settings)) as self.checkpointed,
                self.engine.watch,
            ):
                for index in range(settings.steps):
                    self.engine.step(index, self.batch)  # the watch keeps what it measured
                    if self.engine.stopped:
                        break
        except KeyboardInterrupt:
            self.status = "interrupted"
            raise
        except BaseException as exc:
            if self.ranks is not None and not isinstance(exc, GradscopeError) and peer_failed(exc):
                exc = RankFailure(self.ranks.rank, exc)  # not a fault of this rank's model
            misfit = (
                fit.overflow(self.model, self.batch.inputs, exc.cause, self.settings.data.target is None)
                if (isinstance(exc, ModelError) and exc.key == "model")
                else None
            )
            if misfit is not None:  # a bare IndexError of an embedding: the data does not fit the model
                exc = misfit.located(self.settings.origin.source, self.settings.origin.lines)
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            if isinstance(exc, ModelError) and self.steps:  # a raise after steps whose updates may have left NaN
                self.nonfinite = nonfinite_parameters(self.model)
            if misfit is not None:
                raise exc from None
            raise exc
        finally:
            self._duration = time.perf_counter() - start
        self.status = "completed"
        return self.report()

    @property
    def steps(self) -> list[StepRecord]:
        """The steps measured so far (the watch's record of them)."""
        return self.engine.watch.steps if self.engine is not None else []

    def report(self) -> Report:
        """What was measured so far, with the anomalies the rules find in it (judged once per change)."""
        key = (len(self.steps), self.status, self.error, self._duration, len(self.checkpointed), self.engine is None)
        return self._report.get(key, self._judged)

    def _judged(self) -> Report:
        infos = describe_parameters(unwrap(self.model, compiled=True))  # a compiled model's own names
        called = self.engine.watch.called if self.engine is not None else None
        gradchecks = self.engine.gradchecks if self.engine is not None else ()
        steps = tuple(self.steps)
        fields = self.engine.watch.report_fields() if self.engine is not None else {}
        report = Report(
            self._run_info(infos), tuple(infos), steps, called_modules=called or None, gradchecks=gradchecks, **fields
        )
        return judged(report, self.settings.checks, self.baseline)

    def _run_info(self, infos: list[ParamInfo]) -> RunInfo:
        settings = self.settings
        return run_info(
            self.model,
            infos,
            len(self.steps),
            self.ranks,
            device=str(self.device),
            precision=settings.precision,
            steps_requested=settings.steps,
            status=self.status,
            error=self.error,
            nonfinite_parameters=self.nonfinite,
            config=settings.origin.source,
            model_target=settings.model.target,
            seed=settings.seed,
            optimizer=settings.optimizer.name if settings.optimizer else None,
            lr=settings.optimizer.lr if settings.optimizer else None,
            clip=settings.clip.model_dump() if settings.clip else None,
            checkpointed_modules=tuple(self.checkpointed),
            batch=self.batch.describe() + (f" on each of {self.ranks.world} ranks" if self.ranks else ""),
            duration_s=round(self._duration, 4),
            notes=self._notes(),
        )

    def _notes(self) -> tuple[str, ...]:
        notes = list(self.engine.watch.notes) if self.engine is not None else []
        if self.settings.precision == "fp16" and not self.settings.uses_scaler:
            notes.append(
                "fp16 without a grad scaler (scaler: false): the loss is not scaled, so gradients below fp16's "
                "smallest subnormal (6e-8) flush to zero; gradient_underflow says where"
            )
        notes.extend(f"{key}: {text}" for key, text in fit.advice(self.settings))
        if self.ranks is not None and self.settings.precision != "fp32":
            notes.append("distributed run: the gradient underflow check (an fp32 replay of one rank) is off")
        if self.ranks is not None and self.ranks.sharded:
            notes.append("FSDP: a NaN made in the backward pass is reported without the autograd node that made it")
        return tuple(notes)


def _rows(batch: loading.Batch) -> int:
    """The batch's leading dimension (its first tensor's)."""
    tensors = tensors_in([batch.inputs, batch.labels])
    return int(tensors[0].shape[0]) if tensors and tensors[0].ndim else 1


def inspect(config: str | Path | Settings | dict[str, Any]) -> Report:
    """Run gradscope on a config (a YAML path, a dict as YAML would give, or ``Settings``).

    Raises:
        GradscopeError: the config is invalid or the model, data or loss raised.
    """
    if isinstance(config, (str, Path)):
        settings = load_config(config)
    elif isinstance(config, dict):
        settings = settings_from_dict(config)
    else:
        settings = config
    return Inspection(settings).run()


class _located:
    """Re-raise a ``GradscopeError`` told where its key stands in the config file."""

    def __init__(self, settings: Settings) -> None:
        self.origin = settings.origin

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, GradscopeError):
            raise exc.located(self.origin.source, self.origin.lines) from exc.__cause__
        return False


def _memory_options(settings: Settings) -> MemoryOptions | None:
    spec = settings.memory
    if not spec.ledger:
        return None
    return MemoryOptions(tuple(spec.candidates), spec.flops, spec.budget)


def _patterns(settings: Settings) -> list[str]:
    return settings.checkpointing.modules if settings.checkpointing else []
