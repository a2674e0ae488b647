"""Gradient histograms on the CPU, where a tensor's values are read without a device sync.

The buckets are those of the chunked path (``gradscope.probes.histograms``), bit for bit: the
same ``floor((g - min) * (BINS / (max - min)))`` in the gradient's own dtype. What changes is
how the work is laid out. Small gradients of one shape are stacked into rows of one matrix, so
each row's bounds and bucket offsets broadcast instead of being gathered for every entry (the
chunked path's ``repeat_interleave``, a pass of its own per bound), and its sums are row
reductions instead of segment reductions. A large gradient is bucketed slice by slice, each
slice's arithmetic done while it sits in the cache.

Only finite gradients take this path: a gradient whose minimum or maximum is NaN or Inf (its
bounds must then skip the non-finite entries, which costs a masked copy) goes to the chunked
path, as do empty and half-precision ones. Checking that is a read of the bounds, free on the
CPU; on a GPU it would be a sync, so GPUs keep the chunked path.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

BINS = 30
WIDTH = 6 + BINS  # min, max, count, sum, sum of squares, non-finite count, then the bucket counts
_SMALL = 1 << 14  # gradients with fewer entries are stacked with the others of their shape
_SLICE = 1 << 18  # entries of a large gradient bucketed at once (1 MiB of float32: in the L2 cache)
_FAST = (torch.float32, torch.float64)

Fallback = Callable[[list[torch.Tensor]], torch.Tensor]


def cpu_histograms(grads: list[torch.Tensor], fallback: Fallback) -> torch.Tensor:
    """The ``(len(grads), WIDTH)`` float64 table of ``gradient_histograms`` for CPU gradients.

    Args:
        grads: the gradients.
        fallback: the chunked path, for the gradients this one leaves out (see the module).
    """
    out = torch.empty((len(grads), WIDTH), dtype=torch.float64)
    shapes: dict[tuple[torch.Size, torch.dtype], list[int]] = defaultdict(list)
    large, redo = [], []
    for i, g in enumerate(grads):
        if g.dtype not in _FAST or not g.numel():
            redo.append(i)
        elif g.numel() < _SMALL:
            shapes[(g.shape, g.dtype)].append(i)
        else:
            large.append(i)
    with torch.no_grad():
        for members in shapes.values():
            rows = _rows(torch.stack([grads[i] for i in members]).reshape(len(members), -1))
            if rows is None:
                redo.extend(members)
            else:
                out[members] = rows
        for i in large:
            row = _large(grads[i].reshape(-1))
            if row is None:
                redo.append(i)
            else:
                out[i] = row
    if redo:
        out[redo] = fallback([grads[i] for i in redo]).to(torch.float64)
    return out


def _scale(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    # Finite even for a one-valued gradient (hi == lo), whose entries all land in bucket 0.
    return BINS / (hi - lo).clamp_min(BINS * torch.finfo(lo.dtype).tiny)


def _finite(*bounds: torch.Tensor) -> bool:
    """All bounds finite (NaN propagates through ``aminmax``; an Inf entry is a bound itself)."""
    return bool(torch.isfinite(torch.stack([b.reshape(-1) for b in bounds])).all())


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """The table rows of same-shape gradients stacked as ``x`` (tensors, entries), or None when
    one of them holds a NaN or Inf."""
    lo, hi = x.amin(dim=1), x.amax(dim=1)  # aminmax over a dim is ~20x slower on the CPU than the two
    if not _finite(lo, hi):
        return None
    tensors, entries = x.shape
    # Entries are finite and at least ``lo``: slots land in 0..BINS, the maximum's BINS folded into BINS - 1.
    slot = torch.sub(x, lo[:, None]).mul_(_scale(lo, hi)[:, None]).floor_().clamp_(0, BINS - 1).int()
    if tensors > 1:
        slot += torch.arange(0, tensors * BINS, BINS, dtype=torch.int32)[:, None]
    counts = torch.bincount(slot.view(-1), minlength=tensors * BINS).reshape(tensors, BINS)
    sums = torch.stack([x.sum(dim=1), torch.linalg.vecdot(x, x)], dim=1)
    count = torch.full((tensors, 1), entries, dtype=torch.float64)
    return torch.cat([lo[:, None].double(), hi[:, None].double(), count, sums.double(), count * 0, counts], dim=1)


def _large(flat: torch.Tensor) -> torch.Tensor | None:
    """One large gradient's table row, bucketed slice by slice; None when it holds a NaN or Inf."""
    lo, hi = torch.aminmax(flat)
    if not _finite(lo, hi):
        return None
    scale = _scale(lo, hi)
    counts = torch.zeros(BINS, dtype=torch.int64)
    sums = []
    for part in flat.split(_SLICE):
        slot = torch.sub(part, lo).mul_(scale).floor_().clamp_(0, BINS - 1).int()
        counts += torch.bincount(slot, minlength=BINS)
        sums.append(torch.stack([part.sum(), torch.dot(part, part)]))
    total, squares = torch.stack(sums).double().sum(dim=0)
    head = torch.stack([lo.double(), hi.double(), torch.tensor(float(flat.numel()), dtype=torch.float64)])
    return torch.cat([head, total[None], squares[None], torch.zeros(1, dtype=torch.float64), counts.double()])
