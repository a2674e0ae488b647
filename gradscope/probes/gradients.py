"""The gradient probe: which parameters got a gradient, and their statistics, read once per step.

Hooks only record arrival (``Tensor.register_post_accumulate_grad_hook``, one
per trainable parameter, shared parameters once). The statistics are computed
after backward in a few batched ``torch._foreach_norm`` calls per (device,
dtype) group and copied to the host in one transfer: no ``.item()`` per
parameter, one host sync per step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradscope.report import ParamInfo

# Columns of the per-parameter readings, in order (EXTRA_NORM only when asked for).
GRAD_NORM, GRAD_MAX_ABS, GRAD_NONZERO, PARAM_NORM, EXTRA_NORM = range(5)


@dataclass(frozen=True)
class Readings:
    """Per-parameter statistics of one step, on the host.

    ``rows[i]`` belongs to ``params[index[i]]``; parameters that got no
    gradient have no row. ``nonfinite`` maps a row's parameter index to its
    exact (NaN count, Inf count, max |g| over finite entries), filled only for
    parameters whose norm was not finite.
    """

    index: list[int]
    rows: list[list[float]]
    scalars: list[float]
    nonfinite: dict[int, tuple[int, int, float]]


class GradientProbe:
    """Watches every trainable parameter of ``model``. Use as a context manager.

    Args:
        model: the module whose parameters to watch; it is left unchanged
            once the ``with`` block exits, also on error.
        extra_norm: another p-norm to read per gradient (column ``EXTRA_NORM``),
            e.g. the norm type gradients are clipped by.
    """

    def __init__(self, model: nn.Module, extra_norm: float | None = None) -> None:
        self.extra_norm = extra_norm
        self.infos = describe_parameters(model)
        by_name = dict(model.named_parameters())
        self.params = [by_name[info.name] for info in self.infos if info.trainable]
        self.names = [info.name for info in self.infos if info.trainable]
        self._arrived: set[int] = set()
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

    def arrived(self) -> list[int]:
        """Indices (into ``params``) of the parameters that got a gradient since ``begin_step``."""
        return sorted(self._arrived)

    def read(self, scalars: list[torch.Tensor]) -> Readings:
        """Statistics of the gradients that arrived, plus ``scalars``, in one host transfer.

        Call after backward (and after unscaling) and before anything changes
        the gradients or parameters (clipping, the optimizer step).

        Args:
            scalars: 0-d tensors to fetch in the same transfer (loss, loss scale, ...).
        """
        index = [i for i in self.arrived() if self.params[i].grad is not None]
        grads = [self.params[i].grad for i in index]
        order, table = summarize(grads, [self.params[i] for i in index], self.extra_norm)
        index = [index[j] for j in order]
        flat = _fetch(table, scalars)  # the step's one host sync
        width = table.shape[1]
        rows = [flat[r * width : (r + 1) * width] for r in range(len(index))]
        bad = [index[r] for r, row in enumerate(rows) if not math.isfinite(row[GRAD_NORM])]
        return Readings(index, rows, flat[len(index) * width :], self._nonfinite(bad) if bad else {})

    def _nonfinite(self, bad: list[int]) -> dict[int, tuple[int, int, float]]:
        # Rare path (a non-finite norm was seen): exact counts, at the cost of another sync.
        grads = [_values(self.params[i].grad) for i in bad]
        counts = torch.stack([torch.stack([g.isnan().sum(), g.isinf().sum()]) for g in grads]).tolist()
        maxima = torch.stack([_finite_max(g) for g in grads]).tolist()
        return {i: (n, f, m) for i, (n, f), m in zip(bad, counts, maxima)}

    def _arrival(self, i: int):  # noqa: ANN202 - a hook closure
        arrived = self._arrived

        def hook(_: torch.Tensor) -> None:
            arrived.add(i)

        return hook


def describe_parameters(model: nn.Module) -> list[ParamInfo]:
    """Every distinct parameter once, under its first name, with the other names it goes by."""
    aliases: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases[id(param)].append(name)
    infos = []
    for name, param in model.named_parameters():
        infos.append(
            ParamInfo(
                name=name,
                module=name.rpartition(".")[0],
                shape=tuple(param.shape),
                numel=param.numel(),
                dtype=str(param.dtype).removeprefix("torch."),
                trainable=param.requires_grad,
                aliases=tuple(n for n in aliases[id(param)] if n != name),
            )
        )
    return infos


def summarize(
    grads: list[torch.Tensor], params: list[torch.Tensor], extra_norm: float | None = None
) -> tuple[list[int], torch.Tensor]:
    """Per-tensor statistics, batched per (device, dtype) group.

    Norms accumulate in float64 (float32 on MPS, which has no float64): in
    float32 the squares of gradients below ~1e-19 underflow to zero, which is
    how ``torch.linalg.vector_norm`` reports a vanishing gradient as exactly 0.

    Returns:
        ``order`` and a table: row ``r`` holds grad L2 norm, max |g|,
        count of non-zero entries, the parameter's L2 norm (and the grad's
        ``extra_norm``-norm) for ``grads[order[r]]``.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, g in enumerate(grads):
        groups[(g.device, g.dtype)].append(i)
    if not groups:
        return [], torch.zeros((0, 4 if extra_norm is None else 5), dtype=torch.float64)
    order: list[int] = []
    tables = []
    home = grads[0].device
    dtype = torch.float32 if home.type == "mps" else torch.float64
    for members in groups.values():
        gs = [_values(grads[i]) for i in members]
        ps = [params[i].detach() for i in members]
        columns = [
            _norms(gs, 2.0, dtype),
            _norms(gs, math.inf, dtype),
            _norms(gs, 0.0, dtype),  # the 0-"norm" counts non-zero entries (NaN counts as non-zero)
            _norms(ps, 2.0, dtype),
        ]
        if extra_norm is not None:
            columns.append(_norms(gs, extra_norm, dtype))
        tables.append(torch.stack(columns, dim=1).to(home, non_blocking=True))
        order.extend(members)
    return order, torch.cat(tables)


def _norms(tensors: list[torch.Tensor], ord: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(tensors, ord, dtype=dtype))


def _values(grad: torch.Tensor) -> torch.Tensor:
    # A sparse gradient's statistics are those of its stored values.
    return grad.coalesce().values() if grad.is_sparse else grad


def _finite_max(grad: torch.Tensor) -> torch.Tensor:
    """max |g| over the finite entries (0 when there are none)."""
    return grad.abs().masked_fill(~torch.isfinite(grad), 0).amax().float()


def _fetch(table: torch.Tensor, scalars: list[torch.Tensor]) -> list[float]:
    parts = [table.flatten()] + [s.detach().reshape(1).to(table.device, table.dtype) for s in scalars]
    return torch.cat(parts).tolist()
