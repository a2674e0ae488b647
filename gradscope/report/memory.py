"""The memory part of the report: what autograd saved for backward, per module, and beside it the
parameters, gradients, optimizer state and batch; the checkpointing advice made from it.

Plain data (ints, floats, strings). The JSON paths ``memory.saved_bytes``,
``memory.modules[<qualified name>].saved_bytes`` (inclusive) and ``memory.checkpointing[i]``
(``module``, ``frees_bytes``; best first) are a public contract.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModuleMemory:
    """One module's share of the saved tensors of the measured forward.

    Attributes:
        saved_bytes: inclusive: the storages first saved while it or a module inside it ran.
        own_bytes: those saved while it was the innermost running module.
        type: its class name.
        order: the order of its first call in the forward (0: the root).
        keeps_bytes: of ``saved_bytes``, what stays saved if it is checkpointed: its inputs, and
            storages that modules outside it save too (candidates only).
        flops: its forward FLOPs (``torch.utils.flop_counter``; candidates only).
        forward_s: its forward's wall time in the measured step, under the ledger's hooks (candidates only).
        checkpointed: it ran under activation checkpointing (its inputs are what it kept).
        candidate: a block of a repeated module list, or a module the config names.
    """

    saved_bytes: int
    own_bytes: int = 0
    type: str = ""
    order: int = -1
    keeps_bytes: int | None = None
    flops: int | None = None
    forward_s: float | None = None
    checkpointed: bool = False
    candidate: bool = False


@dataclass(frozen=True)
class CheckpointAdvice:
    """Checkpointing one module: what it frees and what the recompute costs.

    Attributes:
        module: its qualified name.
        frees_bytes: its saved bytes minus what checkpointing it must keep.
        flops: the recompute: one more forward of the module.
        forward_s: the module's measured forward time.
        bytes_per_gflop: ``frees_bytes`` per GFLOP of recompute (the ranking).
    """

    module: str
    frees_bytes: int
    flops: int
    forward_s: float | None = None
    bytes_per_gflop: float | None = None


@dataclass(frozen=True)
class CheckpointPlan:
    """The cheapest set of candidates found whose checkpointing fits the budget.

    Attributes:
        budget_bytes: the budget it was made for.
        total_bytes: parameters + gradients + optimizer state + saved activations, measured.
        modules: the modules to checkpoint (empty: the run fits already).
        patterns: the same as ``checkpointing.modules`` patterns (``parent.*`` for a whole list).
        frees_bytes: what checkpointing them frees, predicted.
        recompute_flops: their forward FLOPs, recomputed in backward.
        slowdown: recompute FLOPs over the step's (forward + backward, taken as 3x the forward's).
        fits: the budget is met with them.
        reason: why it cannot fit, when it cannot.
    """

    budget_bytes: int
    total_bytes: int
    modules: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    frees_bytes: int = 0
    recompute_flops: int = 0
    slowdown: float = 0.0
    fits: bool = True
    reason: str | None = None


@dataclass(frozen=True)
class CudaMemory:
    """The CUDA caching allocator's view of the measured step, beside the ledger.

    Attributes:
        allocated_before: ``torch.cuda.memory_allocated`` when the forward started.
        allocated_after: the same when it ended (the loss computed).
        peak: ``max_memory_allocated`` over the step (reset when the forward started).
        ledger_error: (ledger's saved bytes - (after - before)) / (after - before).
    """

    allocated_before: int
    allocated_after: int
    peak: int
    ledger_error: float | None = None


@dataclass(frozen=True)
class MemoryReport:
    """The memory ledger of one measured step (the first the probe saw).

    Attributes:
        step: the step it was measured at.
        saved_bytes: distinct storages autograd saved for backward in the forward (and loss), each
            once at its full size, parameters' and buffers' left out.
        modules: per module (qualified name; the root is ``""``).
        saved_by_dtype: ``saved_bytes`` by the storages' dtype.
        saved_parameter_bytes: parameters' and buffers' storages autograd saved (already counted below).
        outside_bytes: saved while no module of the model ran (the loss): counted under the root.
        parameter_bytes: the model's parameters and buffers, by dtype.
        gradient_bytes: the gradients after the backward, by dtype.
        optimizer_bytes: the optimizer's state after its step, by dtype (None: no optimizer step seen).
        batch_bytes: the tensors the model (and the loss) were given.
        forward_flops: the whole forward's FLOPs.
        cuda: the allocator's view (CUDA only).
        checkpointing: the advice, best first (see ``rules.checkpoint_advice``).
        plan: with a budget, the set of modules to checkpoint to fit it.
        notes: what the ledger could not see, and why.
    """

    step: int
    saved_bytes: int
    modules: dict[str, ModuleMemory]
    saved_by_dtype: dict[str, int] = field(default_factory=dict)
    saved_parameter_bytes: int = 0
    outside_bytes: int = 0
    parameter_bytes: dict[str, int] = field(default_factory=dict)
    gradient_bytes: dict[str, int] = field(default_factory=dict)
    optimizer_bytes: dict[str, int] | None = None
    batch_bytes: int = 0
    forward_flops: int | None = None
    cuda: CudaMemory | None = None
    checkpointing: tuple[CheckpointAdvice, ...] = ()
    plan: CheckpointPlan | None = None
    notes: tuple[str, ...] = ()

    @property
    def state_bytes(self) -> int:
        """Parameters + gradients + optimizer state."""
        opt = sum(self.optimizer_bytes.values()) if self.optimizer_bytes else 0
        return sum(self.parameter_bytes.values()) + sum(self.gradient_bytes.values()) + opt

    @property
    def total_bytes(self) -> int:
        """Parameters + gradients + optimizer state + saved activations."""
        return self.state_bytes + self.saved_bytes


_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)\s*$")


def parse_bytes(text: Any) -> int:
    """``"512MiB"``, ``"6GB"``, ``"6GiB"``, ``"1.5GiB"`` -> bytes.

    Raises:
        ValueError: no unit, an unknown unit, a negative or zero size, or not a size at all.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"expected a size with a unit such as 512MiB, 6GB or 6GiB, got {text!r}")
    raw = str(text).strip()
    if raw.startswith("-"):
        raise ValueError(f"expected a positive size with a unit such as 512MiB or 6GiB, got {text!r}")
    if isinstance(text, (int, float)) or re.fullmatch(r"\d+(\.\d*)?", raw):
        raise ValueError(f"give the unit: 512MiB, 6GB or 6GiB (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {text!r}")
    match = _SIZE.match(raw)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"expected a size such as 512MiB, 6GB or 6GiB (units B, KB..TB, KiB..TiB), got {text!r}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"expected a positive size, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``; binary units, three significant digits."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1024
    return f"{size:.3g} GiB"
