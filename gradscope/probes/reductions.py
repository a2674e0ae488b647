"""The reductions behind the gradient statistics: per-tensor norms, max |g| and non-zero counts of
many tensors at once, without a host sync.

On GPUs the foreach reductions are fused multi-tensor kernels. On the CPU a foreach reduction is
a loop of per-tensor kernels, so small tensors of one shape are stacked and reduced together and
large ones are reduced one by one, their results stacked once per column.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


def device_columns(gs: list[torch.Tensor], ps: list[torch.Tensor], extra_norm: float | None) -> list[torch.Tensor]:
    """On GPUs the foreach reductions are fused multi-tensor kernels: a few launches for any count."""
    columns = [
        _norms(gs, 2.0),
        _norms(gs, math.inf),
        # Counts go in float64: float32 counts stop being exact past 2**24 entries.
        torch.stack(torch._foreach_norm(gs, 0.0, dtype=torch.float64)),
        _norms(ps, 2.0),
    ]
    if extra_norm is not None:
        columns.append(_norms(gs, extra_norm))
    return columns


# On the CPU, a foreach reduction is a loop of per-tensor kernels (~2 us each), and the inf- and
# 0-"norms" are slow per element. Small tensors of one shape are stacked and reduced together
# (a deep model has hundreds of them and a handful of shapes); large ones are reduced one by one.
_CPU_LARGE = 1 << 14


def cpu_columns(gs: list[torch.Tensor], ps: list[torch.Tensor], extra_norm: float | None) -> list[torch.Tensor]:
    width = 4 if extra_norm is None else 5
    out = torch.empty((len(gs), width), dtype=torch.float64)
    shapes: dict[torch.Size, list[int]] = defaultdict(list)
    large = []
    for i, g in enumerate(gs):
        if g.numel() < _CPU_LARGE:
            shapes[g.shape].append(i)
        else:
            large.append(i)
    if large:
        out[large] = _large_stats([gs[i] for i in large], [ps[i] for i in large], extra_norm)
    for members in shapes.values():
        g = torch.stack([gs[i] for i in members]).reshape(len(members), -1)  # (tensors, entries)
        p = torch.stack([ps[i] for i in members]).reshape(len(members), -1)
        out[members] = _row_stats(g, p, extra_norm)
    return list(out.unbind(1))


def _row_stats(g: torch.Tensor, p: torch.Tensor, extra_norm: float | None) -> torch.Tensor:
    """Per row of ``g`` (tensors, entries): L2 norm, max |g|, non-zero count, ``p``'s L2 norm."""
    columns = [
        torch.linalg.vector_norm(g, dim=1, dtype=norm_dtype(g)),
        _row_max_abs(g),
        # count_nonzero over a dim is several times slower than over a whole tensor.
        torch.count_nonzero(g).double().reshape(1) if g.shape[0] == 1 else (g != 0).sum(dim=1).double(),
        torch.linalg.vector_norm(p, dim=1, dtype=norm_dtype(p)),
    ]
    if extra_norm is not None:
        columns.append(torch.linalg.vector_norm(g, ord=extra_norm, dim=1, dtype=norm_dtype(g)))
    return torch.stack([c.double() for c in columns], dim=1)


def _large_stats(gs: list[torch.Tensor], ps: list[torch.Tensor], extra_norm: float | None) -> torch.Tensor:
    """``_row_stats`` of large tensors of one dtype, one row each: the same reductions tensor by
    tensor, their 0-d results stacked once per column rather than combined per tensor (a dozen
    small kernels each)."""
    dtype = norm_dtype(gs[0])
    rows = [g.reshape(1, -1) for g in gs]
    read = [_one_read(g, dtype) for g in gs]
    low, high = torch.stack([r[0] for r in read]), torch.stack([r[1] for r in read])
    columns = [
        torch.stack([r[3] for r in read]),
        torch.maximum(low.abs(), high.abs()).to(dtype),
        torch.stack([r[2] for r in read]),
        torch.cat([torch.linalg.vector_norm(p.reshape(1, -1), dim=1, dtype=dtype) for p in ps]),
    ]
    if extra_norm is not None:
        columns.append(torch.cat([torch.linalg.vector_norm(g, ord=extra_norm, dim=1, dtype=dtype) for g in rows]))
    return torch.stack([c.double() for c in columns], dim=1)


# A slice of a large gradient small enough to stay in the CPU's cache between two reductions, and
# the size past which slicing pays for its extra kernels (a tensor that fits in cache gains nothing).
_SLICE = 1 << 16
_SLICED_ABOVE = 1 << 18


def _one_read(g: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The min, max (``aminmax``: no |g| copy), non-zero count and L2 norm (in ``dtype``) of ``g``, 0-d each.

    A contiguous tensor of more than ``_SLICED_ABOVE`` entries is read from memory once, slice by
    slice, the count and the norm taken right after ``aminmax`` while the slice is in cache: on
    gradients larger than the cache that is one pass over memory instead of three. The slices'
    minima, maxima and counts combine exactly; their norms combine in float64."""
    if g.numel() <= _SLICED_ABOVE or not g.is_contiguous():
        low, high = torch.aminmax(g)
        return low, high, torch.count_nonzero(g), torch.linalg.vector_norm(g, dtype=dtype)
    # A half-precision slice's norm comes out a few 1e-5 off the whole tensor's: those keep their own pass.
    sliced_norm = g.dtype in (torch.float32, torch.float64)
    lows, highs, counts, norms = [], [], [], []
    for part in g.view(-1).split(_SLICE):
        low, high = torch.aminmax(part)
        lows.append(low)
        highs.append(high)
        counts.append(torch.count_nonzero(part))
        if sliced_norm:
            norms.append(torch.linalg.vector_norm(part, dtype=dtype))
    if sliced_norm:
        norm = torch.stack(norms).double().square().sum().sqrt().to(dtype)
    else:
        norm = torch.linalg.vector_norm(g, dtype=dtype)
    return torch.stack(lows).amin(), torch.stack(highs).amax(), torch.stack(counts).sum(), norm


def _row_max_abs(g: torch.Tensor) -> torch.Tensor:
    if not g.shape[1]:
        return g.new_zeros(g.shape[0], dtype=torch.float32)
    if g.shape[0] == 1:  # one large tensor: aminmax reads it once without an |g| copy
        low, high = torch.aminmax(g)
        return torch.maximum(low.abs(), high.abs()).to(norm_dtype(g)).reshape(1)
    return g.abs().amax(dim=1).to(norm_dtype(g))


def l2_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor (no sync), each in ``norm_dtype`` (float32 or float64); on the CPU,
    same-shape small tensors of one dtype are stacked."""
    if not tensors or tensors[0].device.type != "cpu":
        return _norms(tensors, 2.0) if tensors else torch.zeros(0)
    out = torch.empty(len(tensors), dtype=max((norm_dtype(t) for t in tensors), key=_width))
    shapes: dict[tuple[torch.Size, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        if t.numel() < _CPU_LARGE:
            shapes[(t.shape, t.dtype)].append(i)
        else:
            out[i] = torch.linalg.vector_norm(t, dtype=norm_dtype(t)).to(out.dtype)
    for members in shapes.values():
        stacked = torch.stack([tensors[i] for i in members]).reshape(len(members), -1)
        out[members] = torch.linalg.vector_norm(stacked, dim=1, dtype=norm_dtype(stacked)).to(out.dtype)
    return out


def _norms(tensors: list[torch.Tensor], ord: float) -> torch.Tensor:
    """Each tensor's ``ord``-norm, one foreach call per dtype (float64 tensors keep float64)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1:
        return torch.stack(torch._foreach_norm(tensors, ord, dtype=norm_dtype(tensors[0])))
    out = torch.empty(len(tensors), dtype=max((norm_dtype(t) for t in tensors), key=_width), device=tensors[0].device)
    for dtype in dtypes:
        members = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        out[members] = _norms([tensors[i] for i in members], ord).to(out.dtype)
    return out


def norm_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a norm of ``tensor`` is taken in: float32, or float64 for a float64 tensor
    (narrowing it is an error in torch, and would lose what a float64 model keeps)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _width(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


def real_values(tensor: torch.Tensor) -> torch.Tensor:
    """A complex tensor's moduli: the same L2 and p-norms, max |z| and non-zero count as the
    complex entries (torch's norms reject a real dtype for complex input)."""
    return tensor.abs() if tensor.is_complex() else tensor
