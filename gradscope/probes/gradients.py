"""The gradient probe: which parameters got a gradient, and their statistics, read once per step.

Hooks only record arrival (``Tensor.register_post_accumulate_grad_hook``, one
per trainable parameter, shared parameters once). The statistics are computed
after backward in a few batched reductions per (device, dtype) group
(``gradscope.probes.reductions``) and copied to the host in one transfer: no
``.item()`` per parameter, one host sync per step.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd import Variable
from torch.utils.hooks import RemovableHandle

from gradscope.probes.reductions import cpu_columns, device_columns, l2_norms, real_values
from gradscope.report import ParamInfo
from gradscope.report.rows import EXTRA_NORM, GRAD_MAX_ABS, GRAD_NONZERO, GRAD_NORM, PARAM_NORM, Readings  # noqa: F401 (the row layout, importable here too)


@dataclass(frozen=True)
class Measurement:
    """Device-side statistics: ``table`` row ``r`` belongs to ``params[index[r]]``."""

    index: list[int]
    table: torch.Tensor


class GradientProbe:
    """Watches every trainable parameter of ``model``. Use as a context manager.

    Args:
        model: the module whose parameters to watch; it is left unchanged
            once the ``with`` block exits, also on error.
        extra_norm: another p-norm to read per gradient (column ``EXTRA_NORM``),
            e.g. the norm type gradients are clipped by.
    """

    def __init__(self, model: nn.Module, extra_norm: float | None = None, shards: Any = None) -> None:
        self.extra_norm = extra_norm
        self.shards = shards  # FSDP: a ``distributed.Ranks`` to reduce the local shards' rows across ranks
        self.infos = describe_parameters(model)
        by_name = dict(model.named_parameters())
        self.params = [by_name[info.name] for info in self.infos if info.trainable]
        self.names = [info.name for info in self.infos if info.trainable]
        self.on_backward_end: Callable[[], None] | None = None  # called once at the end of each backward
        self.stale: set[int] = set()  # parameters whose gradient was added onto the last step's
        self._arrived: set[int] = set()
        self._marks: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self._queued = False
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> GradientProbe:
        try:
            for i, param in enumerate(self.params):
                self._handles.append(param.register_post_accumulate_grad_hook(self._arrival(i)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook this probe registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def begin_step(self) -> None:
        """Forget which parameters got a gradient: call before each backward."""
        self._arrived.clear()
        self.stale.clear()

    def mark_step(self) -> None:
        """Remember each gradient as the optimizer leaves it; a later backward that accumulates onto
        it unchanged (no ``zero_grad`` in between) marks the parameter stale."""
        # Each ``.grad`` read once: on a Parameter it is a property lookup through torch's function
        # dispatch (~1 us), a millisecond a step on a model of a thousand tensors.
        self._marks = {i: (weakref.ref(g), g._version) for i, p in enumerate(self.params) if (g := p.grad) is not None}

    def arrived(self) -> list[int]:
        """Indices (into ``params``) of the parameters that got a gradient since ``begin_step``."""
        return sorted(self._arrived)

    def measure(self) -> Measurement:
        """Start the statistics of the gradients that arrived, on the device (no host sync)."""
        index, grads = self._arrived_grads()
        order, table = summarize(
            [to_local(g) for g in grads], [to_local(self.params[i]) for i in index], self.extra_norm
        )
        if self.shards is not None:
            table = self.shards.reduce_rows(table, self.extra_norm)
        return Measurement([index[j] for j in order], table)

    def grad_norms(self) -> tuple[list[int], torch.Tensor]:
        """The L2 norm of each gradient that arrived, on the device: indices and norms (no sync)."""
        index, grads = self._arrived_grads()
        if not index:
            return [], torch.zeros(0)
        norms = l2_norms([_values(g) for g in grads]).double()
        if self.shards is not None:
            norms = self.shards.reduce_sum(norms.square()).sqrt()
        return index, norms

    def _arrived_grads(self) -> tuple[list[int], list[torch.Tensor]]:
        """The indices and gradients of the parameters that got one (each ``.grad`` read once)."""
        pairs = [(i, g) for i in self.arrived() if (g := self.params[i].grad) is not None]
        return [i for i, _ in pairs], [g for _, g in pairs]

    def fetch(self, measurement: Measurement, scalars: list[torch.Tensor]) -> Readings:
        """Copy a measurement and ``scalars`` to the host in one transfer."""
        index, table = measurement.index, measurement.table
        flat = _fetch(table, scalars)  # the step's one host sync
        width = table.shape[1]
        rows = [flat[r * width : (r + 1) * width] for r in range(len(index))]
        readings = Readings(index, rows, flat[len(index) * width :], {})
        redo = [r for r, row in enumerate(rows) if _needs_float64(row)]
        if redo:
            self._refine(readings, redo)
        return readings

    def _refine(self, readings: Readings, redo: list[int]) -> None:
        """Rare path: exact numbers for rows float32 cannot hold (another host sync).

        Non-finite gradients get their NaN and Inf counts and the max |g| of
        their finite entries; gradients beyond float32's squaring range (all
        below ~1e-18, as in a vanishing network, or above ~1e18) get their
        norm again in float64.
        """
        grads = [_values(self.params[readings.index[r]].grad) for r in redo]
        exact = torch.stack([_exact_row(g) for g in grads])
        if self.shards is not None:
            exact = self.shards.reduce_exact(exact)
        exact = exact.tolist()
        for r, (norm, finite_max, nans, infs) in zip(redo, exact):
            readings.rows[r][GRAD_NORM], readings.rows[r][GRAD_MAX_ABS] = norm, finite_max
            if nans or infs:
                readings.nonfinite[readings.index[r]] = (int(nans), int(infs))

    def _arrival(self, i: int) -> Callable[[torch.Tensor], None]:
        arrived = self._arrived

        def hook(param: torch.Tensor) -> None:
            arrived.add(i)
            mark = self._marks.get(i)
            if mark is not None and (g := mark[0]()) is not None and g is param.grad and g._version == mark[1] + 1:
                self.stale.add(i)  # accumulated onto last step's gradient, which nobody zeroed
            if not self._queued and self.on_backward_end is not None:
                self._queued = True
                Variable._execution_engine.queue_callback(self._backward_done)

        return hook

    def _backward_done(self) -> None:
        # DDP and FSDP queue their own end-of-backward work (the all-reduce results written into
        # .grad) at their first hook, which may come after ours: look once that has run too.
        Variable._execution_engine.queue_callback(self._after_others)

    def _after_others(self) -> None:
        self._queued = False
        if self.on_backward_end is not None:
            self.on_backward_end()


def describe_parameters(model: nn.Module) -> list[ParamInfo]:
    """Every distinct parameter once, under its first name, with the other names it goes by."""
    aliases: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases[id(param)].append(name)
    modules = dict(model.named_modules())
    infos = []
    for name, param in model.named_parameters():
        owner = modules.get(name.rpartition(".")[0])
        infos.append(
            ParamInfo(
                name=name,
                module=name.rpartition(".")[0],
                shape=tuple(param.shape),
                numel=param.numel(),
                dtype=str(param.dtype).removeprefix("torch."),
                trainable=param.requires_grad,
                aliases=tuple(n for n in aliases[id(param)] if n != name),
                module_type=type(owner).__name__ if owner is not None else "",
            )
        )
    return infos


def summarize(
    grads: list[torch.Tensor], params: list[torch.Tensor], extra_norm: float | None = None
) -> tuple[list[int], torch.Tensor]:
    """Per-tensor statistics, batched per (device, dtype) group, without a host sync.

    Norms are taken in float32, which is exact enough wherever the squares
    of the entries stay in float32's range; ``read`` redoes the rows outside
    it in float64 (``_needs_float64``).

    Returns:
        ``order`` and a table (float64; float32 on MPS, which has none): row
        ``r`` holds grad L2 norm, max |g|, count of non-zero entries, the
        parameter's L2 norm (and the grad's ``extra_norm``-norm) for
        ``grads[order[r]]``.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, g in enumerate(grads):
        groups[(g.device, g.dtype)].append(i)
    width = 4 if extra_norm is None else 5
    if not groups:
        return [], torch.zeros((0, width), dtype=torch.float64)
    home = grads[0].device
    dtype = torch.float32 if home.type == "mps" else torch.float64
    order: list[int] = []
    tables = []
    with torch.no_grad():  # rather than a detach per parameter (a thousand calls on a deep model)
        for members in groups.values():
            gs = [_values(grads[i]) for i in members]
            ps = [real_values(params[i]) for i in members]
            columns = cpu_columns(gs, ps, extra_norm) if home.type == "cpu" else device_columns(gs, ps, extra_norm)
            tables.append(torch.stack([c.to(dtype) for c in columns], dim=1).to(home, non_blocking=True))
            order.extend(members)
    return order, torch.cat(tables)


def _needs_float64(row: list[float]) -> bool:
    """A row whose float32 norm may be wrong: non-finite, or entries too small or large to square."""
    norm, max_abs = row[GRAD_NORM], row[GRAD_MAX_ABS]
    if not (math.isfinite(norm) and math.isfinite(max_abs)):
        return True
    return max_abs != 0.0 and not (1e-18 <= max_abs <= 1e18)


def _exact_row(grad: torch.Tensor) -> torch.Tensor:
    """float64 L2 norm, max |g| over finite entries, NaN count, Inf count."""
    finite = torch.isfinite(grad)
    dtype = torch.float32 if grad.device.type == "mps" else torch.float64
    return torch.stack(
        [
            torch.linalg.vector_norm(grad, dtype=dtype),
            grad.abs().masked_fill(~finite, 0).amax().to(dtype) if grad.numel() else grad.new_zeros((), dtype=dtype),
            grad.isnan().sum().to(dtype),
            grad.isinf().sum().to(dtype),
        ]
    )


def _values(grad: torch.Tensor) -> torch.Tensor:
    # A sparse gradient's statistics are those of its stored values; a sharded one's, of its local shard.
    grad = to_local(grad)
    return real_values(grad.coalesce().values() if grad.is_sparse else grad)


def to_local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2 parameters and gradients); any other tensor as it is."""
    if type(tensor) in _PLAIN:
        return tensor
    return tensor.to_local() if is_sharded(tensor) else tensor


_PLAIN = (torch.Tensor, nn.Parameter)


def is_sharded(tensor: Any) -> bool:
    """A DTensor (checked by name: ``torch.distributed.tensor`` is not imported unless in use)."""
    return any(cls.__name__ == "DTensor" for cls in type(tensor).__mro__)


def _fetch(table: torch.Tensor, scalars: list[torch.Tensor]) -> list[float]:
    parts = [table.flatten()] + [s.detach().reshape(-1).to(table.device, table.dtype) for s in scalars]
    return torch.cat(parts).tolist()
