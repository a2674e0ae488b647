"""The report: run facts, per-step per-parameter statistics and anomalies, as plain data.

Everything here is a frozen dataclass of floats, ints and strings: no tensors.
``to_dict``/``from_dict`` give the JSON form, whose paths are a public contract:
``schema_version``, ``steps[i].step``, ``steps[i].loss``, ``steps[i].grad_norm_total``,
``steps[i].parameters[<name>].grad_norm`` (null: no gradient) and ``anomalies[j]``.
Non-finite floats are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``
so that the file is strict JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from gradscope.report.memory import MemoryReport

SCHEMA_VERSION = 1
Severity = Literal["info", "warning", "error"]
SEVERITIES: tuple[str, ...] = get_args(Severity)
KEYED_BY = "json_keyed_by"  # field metadata: in JSON, an object from this field of each element to its others
WRITTEN_AS = "json_written_as"  # field metadata: the JSON stores what this method of the object returns


@dataclass(frozen=True)
class ParamInfo:
    """A parameter of the model, once (tied parameters under their first name)."""

    name: str
    module: str
    shape: tuple[int, ...]
    numel: int
    dtype: str
    trainable: bool
    aliases: tuple[str, ...] = ()
    module_type: str = ""  # class name of the owning module: Linear, Embedding, LayerNorm, ...


@dataclass(frozen=True)
class GradStats:
    """Gradient statistics at one step. ``grad_norm is None``: no gradient arrived."""

    grad_norm: float | None
    grad_max_abs: float | None
    zero_fraction: float | None
    nan_count: int
    inf_count: int
    param_norm: float | None
    grad_to_param: float | None

    @property
    def received(self) -> bool:
        return self.grad_norm is not None


@dataclass(frozen=True)
class ParamStats(GradStats):
    """One parameter's gradient at one step."""


@dataclass(frozen=True)
class ModuleStats(GradStats):
    """The parameters a module owns directly, aggregated (norms combine as sqrt of sum of squares).

    ``parameters`` counts them, ``with_grad`` those that got a gradient.
    """

    parameters: int = 0
    with_grad: int = 0


@dataclass(frozen=True)
class NonfiniteOrigin:
    """Where a NaN or Inf was first made.

    ``phase``: ``forward`` (an op inside the model), ``loss`` (an op of the
    loss, after the model), ``backward`` (an autograd node), ``input`` (the
    batch already held it) or ``parameter`` (a weight already held it).
    """

    phase: str
    kind: str  # nan | inf
    op: str | None = None  # torch.log, F.softmax, MyFunction.backward, ...
    module: str | None = None  # innermost module, with the call number if called several times
    source: str | None = None  # the user's line: file:line in function: code
    node: str | None = None  # the autograd node (backward only)
    dtype: str | None = None
    count: int = 0  # non-finite values in the op's output
    numel: int = 0
    input_min: float | None = None  # range of the op's finite inputs (forward only)
    input_max: float | None = None
    tensors: tuple[str, ...] = ()  # input/parameter phases: which tensors
    samples: tuple[int, ...] = ()  # forward/loss/input phases: batch rows holding it at the origin op
    rank: int | None = None  # distributed runs: the first rank where it was made


@dataclass(frozen=True)
class BackwardFailure:
    """PyTorch raised in backward: its message, the autograd node that failed, the user's forward
    line that created that node and the module whose call did (it saved the tensor), and for a
    saved tensor changed in place, the op, module and line that changed it."""

    message: str
    node: str | None = None
    source: str | None = None
    module: str | None = None
    modified_by: str | None = None  # the in-place op (Tensor.mul_, Tensor.__iadd__, ...)
    modified_in: str | None = None  # its module (None: outside every module)
    modified_at: str | None = None  # its line


@dataclass(frozen=True)
class ActivationStats:
    """One activation call site at one step.

    ``fraction``: for a ReLU, of its units that are zero for every sample
    (dead); for sigmoid/tanh, of its output values within 0.01 of a bound
    (saturated, where the derivative is below ~0.02). A unit is a feature (the
    last dimension; the channel for 4-D and 5-D outputs); ``samples`` is how
    many values of each unit the batch gave; ``density`` (ReLUs) is the
    fraction of all output values that are above 0.
    """

    kind: str  # relu | sigmoid | tanh
    module: str
    source: str | None
    units: int
    samples: int
    fraction: float  # dead (relu) or saturated (sigmoid/tanh) units
    density: float | None = None  # relu: the fraction of all its output values that are > 0


@dataclass(frozen=True)
class Histogram:
    """A gradient's finite values in equal buckets between ``min`` and ``max``; ``nonfinite`` left out.

    ``edges``: the ``len(buckets) + 1`` bucket edges, from ``min`` to ``max`` (bucket ``i`` holds
    ``edges[i] <= v < edges[i + 1]``, the last one its upper edge too). The JSON always stores them,
    so that a reader can redraw the histogram; empty in memory and in reports written before they
    were stored: ``bucket_edges()`` gives them either way.
    """

    min: float
    max: float
    count: int
    sum: float
    sum_squares: float
    nonfinite: int
    buckets: tuple[int, ...]
    edges: tuple[float, ...] = field(default=(), metadata={WRITTEN_AS: "bucket_edges"})

    def bucket_edges(self) -> tuple[float, ...]:
        """The stored edges, or the equal steps from ``min`` to ``max`` the probe buckets by."""
        if self.edges or not self.buckets:
            return self.edges
        n, width = len(self.buckets), self.max - self.min
        return tuple(self.min + width * i / n for i in range(n)) + (self.max,)

    def limits(self) -> list[float]:
        """The upper edge of each bucket."""
        return list(self.bucket_edges()[1:])


@dataclass(frozen=True)
class GradcheckResult:
    """A custom autograd.Function's backward checked against finite differences (float64)."""

    function: str
    source: str | None
    passed: bool | None  # None: could not be checked
    detail: str | None = None
    module: str | None = None


@dataclass(frozen=True)
class RankStep:
    """One rank's own view of a step in a distributed run: the loss on its slice of the batch and
    (DDP) its gradients before the all-reduce."""

    rank: int
    loss: float | None
    grad_norm: float | None = None  # L2 norm of the rank's own gradients before the all-reduce (DDP)
    nonfinite: tuple[str, ...] = ()  # parameters whose own gradient on this rank held NaN/Inf (DDP)

    @property
    def bad(self) -> bool:
        """The rank saw a non-finite loss or gradient of its own."""
        loss_bad = self.loss is not None and not math.isfinite(self.loss)
        return loss_bad or bool(self.nonfinite) or (self.grad_norm is not None and not math.isfinite(self.grad_norm))


@dataclass(frozen=True)
class StepRecord:
    """One forward/backward pass. Norms are L2 over all trainable gradients, before clipping."""

    step: int
    loss: float | None  # None: not known (gradscope.watch with an optimizer hook sees no loss)
    grad_norm_total: float
    parameters: Mapping[str, ParamStats]  # a ``tables.ParamTable`` when measured, a dict when read from JSON
    modules: Mapping[str, ModuleStats]
    grad_norm_total_clipped: float | None = None
    clip_norm: float | None = None  # the norm clip_grad_norm_ measured, in its norm_type
    clip_coefficient: float | None = None  # what gradients were multiplied by (1.0: not clipped)
    loss_scale: float | None = None  # fp16 only: the scale this step's backward used
    skipped: bool = False  # fp16 only: the scaler skipped the optimizer step (non-finite gradients)
    activations: dict[str, ActivationStats] = field(default_factory=dict)
    origin: NonfiniteOrigin | None = None  # where this step's first NaN/Inf was made
    overflow: NonfiniteOrigin | None = None  # fp16: where the scaled gradients of a skipped step overflowed
    backward_error: BackwardFailure | None = None  # PyTorch raised in backward
    underflow: dict[str, float] | None = None  # low precision: fraction of each gradient flushed to zero
    # Every `histograms_every` steps; a ``tables.HistogramTable`` when measured, a dict when read from JSON.
    histograms: Mapping[str, Histogram] = field(default_factory=dict)
    stale: tuple[str, ...] = ()  # parameters whose gradient was added onto the previous step's (no zero_grad)
    cleared: tuple[str, ...] = ()  # got a gradient in backward, gone (None or zeros) at the optimizer step
    ranks: tuple[RankStep, ...] = ()  # distributed runs: each rank's own loss and gradients
    # Optional probes' values (``watch(probes=...)``): probe name -> key (a parameter...) -> number.
    probes: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class StepSeries:
    """Every step's compact row, kept for the whole run (the full records only for some steps).

    Columns of equal length; ``loss`` and ``clip_coefficient`` hold None where unknown.
    ``clean``: no backward error, no skipped update, finite loss and gradients.
    """

    step: tuple[int, ...] = ()
    loss: tuple[float | None, ...] = ()
    grad_norm_total: tuple[float, ...] = ()
    clip_coefficient: tuple[float | None, ...] = ()
    loss_scale: tuple[float | None, ...] = ()
    clean: tuple[bool, ...] = ()


@dataclass(frozen=True)
class RunTotals:
    """Running totals over every step of the run, for the rules that look across steps when only
    some steps are kept in full."""

    steps: int
    clean_steps: int
    finite_steps: int  # with a finite total gradient norm
    received: tuple[str, ...]  # parameters that got a gradient in some step without a backward error
    missing: tuple[str, ...]  # parameters that got no gradient (or lost entries to underflow) in some clean step
    clipped_steps: int
    skipped_steps: int  # updates the grad scaler skipped for an overflow (no NaN origin)
    clipped: tuple[tuple[int, float, float], ...]  # the first clipped steps: (step, pre-clip norm, coefficient)
    clip_coefficient_median: float | None
    fully_dead: bool  # some clean step had a ReLU dead for every unit


@dataclass(frozen=True)
class Retained:
    """Which steps the report holds in full, and the policy that chose them (``history.Retention``)."""

    kept: tuple[int, ...]
    policy: dict[str, int]
    totals: RunTotals
    series: StepSeries
    stride: int | None = None  # the sample's stride at the end of the run: steps it kept are multiples of it


@dataclass(frozen=True)
class Anomaly:
    """A finding: what is wrong, where, and the numbers that show it."""

    kind: str
    severity: Severity
    message: str
    module: str | None = None
    parameter: str | None = None
    step: int | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None  # distributed runs: the rank where it started


@dataclass(frozen=True)
class LoopFacts:
    """What a watch saw of the user's training loop around the gradients (``gradscope.watch`` and
    the trainer callbacks; None for the CLI, which drives its own steps).

    Counts of steps are of the optimizer steps the watch checked (every measured step).
    """

    optimizer: bool  # an optimizer was watched
    backwards: int  # backward() calls observed
    updates: int  # optimizer.step() calls that ran (a grad scaler skips some)
    checked: int  # optimizer steps whose state was checked before the update
    outside: tuple[str, ...] = ()  # got a gradient, but are in no param group of the optimizer
    inside: int = 0  # parameters that got a gradient and are in the optimizer (at most steps' count)
    lr_zero_steps: int = 0  # steps with a learning rate of 0 in every param group
    lr_zero_first: int | None = None  # the first of them
    cleared_steps: int = 0  # steps whose gradients were cleared between backward() and step()
    cleared_to: str | None = None  # "None" (zero_grad(set_to_none=True)) or "zeros"
    cleared_all_steps: int = 0  # of them, steps at which every gradient the optimizer would use was cleared
    cleared: tuple[str, ...] = ()  # the parameters whose gradient was cleared so, at some step
    no_gradient_steps: int = 0  # steps at which no parameter of the optimizer had a gradient
    moved_checked: int = 0  # steps whose update was measured on a sample of the weights
    unmoved_steps: int = 0  # of them, steps in which no sampled weight moved
    sampled: tuple[str, ...] = ()  # the weights sampled
    eval_steps: int = 0  # steps with the model (the root module) in eval mode
    eval_first: int | None = None
    eval_affected: tuple[str, ...] = ()  # its modules that differ in training, as "name (type)"


@dataclass(frozen=True)
class RunInfo:
    """Facts about the run that produced the report."""

    model: str
    device: str
    precision: str
    steps_requested: int
    steps_completed: int
    parameters_total: int
    parameters_trainable: int
    status: str = "completed"  # completed | interrupted | failed
    error: str | None = None
    config: str | None = None
    model_target: str | None = None
    seed: int | None = None
    optimizer: str | None = None
    lr: float | None = None  # the optimizer's learning rate (its first parameter group's)
    clip: dict[str, float] | None = None
    checkpointed_modules: tuple[str, ...] = ()
    batch: str | None = None
    torch_version: str | None = None
    gradscope_version: str | None = None
    duration_s: float | None = None
    notes: tuple[str, ...] = ()  # what could not be observed, and why
    distributed: dict[str, Any] | None = None  # strategy, world_size, backend
    loop: LoopFacts | None = None  # a watched loop's optimizer, backward and mode facts
    # A failed run: the parameters that held NaN/Inf when it raised (an earlier step's update wrote them).
    nonfinite_parameters: tuple[str, ...] = ()


@dataclass(frozen=True)
class Report:
    """What one gradscope run measured and found."""

    run: RunInfo
    parameters: tuple[ParamInfo, ...] = field(metadata={KEYED_BY: "name"})
    steps: tuple[StepRecord, ...]
    anomalies: tuple[Anomaly, ...] = ()
    called_modules: tuple[str, ...] | None = None  # modules that ran in the first forward (None: not tracked)
    ignored: tuple[Anomaly, ...] = ()  # findings the config's `checks.ignore` accepts
    gradchecks: tuple[GradcheckResult, ...] = ()  # with --gradcheck: each custom autograd.Function
    schema_version: int = SCHEMA_VERSION
    retained: Retained | None = None  # a run that kept only some steps in full (None: every step is here)
    memory: MemoryReport | None = None  # what autograd saved for backward in one step, per module (``memory``)

    def at_or_above(self, severity: str) -> list[Anomaly]:
        """Anomalies whose severity is ``severity`` or worse (``never``: none)."""
        if severity == "never":
            return []
        floor = SEVERITIES.index(severity)
        return [a for a in self.anomalies if SEVERITIES.index(a.severity) >= floor]

    def save(self, path: str) -> None:
        """Write the JSON report to ``path`` (its folder is made; ``gradscope show`` reads it back)."""
        from gradscope.report.report_json import report_text
        from gradscope.utils import outfiles

        outfiles.write_text("--json", path, report_text(self))  # atomic: never a half-written report

    def print(self, show_all: bool = False) -> None:
        """Print the report as ``gradscope inspect`` does (``show_all``: every parameter row)."""
        import sys

        from gradscope.reporters.terminal import TerminalReporter

        TerminalReporter(sys.stdout, show_all=show_all).write(self)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (strict: non-finite floats become strings); see ``report_json``."""
        from gradscope.report.report_json import report_dict

        return report_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Read back what ``to_dict`` wrote."""
        from gradscope.report.report_json import report_from

        return report_from(data)
