"""Gradient histograms, computed on the device without a host sync (fetched with the step's transfer).

Each histogram has ``BINS`` equal buckets between the finite minimum and
maximum of one gradient; non-finite entries are left out and counted.
"""

from __future__ import annotations

import torch

from gradscope.report import Histogram

BINS = 30
WIDTH = 6 + BINS  # min, max, count, sum, sum of squares, non-finite count, then the bucket counts


def gradient_histograms(grads: list[torch.Tensor]) -> torch.Tensor:
    """A ``(len(grads), WIDTH)`` float64 table (float32 on MPS), one row per gradient."""
    rows = [_row(g.detach().flatten()) for g in grads]
    return torch.stack(rows) if rows else torch.zeros((0, WIDTH), dtype=torch.float64)


def _row(g: torch.Tensor) -> torch.Tensor:
    dtype = torch.float32 if g.device.type == "mps" else torch.float64
    finite = torch.isfinite(g)
    values = torch.where(finite, g, torch.zeros_like(g)).to(dtype)
    lo = (
        torch.where(finite, values, torch.full_like(values, float("inf"))).amin() if g.numel() else values.new_zeros(())
    )
    hi = (
        torch.where(finite, values, torch.full_like(values, float("-inf"))).amax()
        if g.numel()
        else values.new_zeros(())
    )
    some = finite.any()
    lo, hi = torch.where(some, lo, 0.0), torch.where(some, hi, 0.0)  # no finite entry: an empty [0, 0]
    span = (hi - lo).clamp_min(torch.finfo(dtype).tiny)
    index = ((values - lo) / span * BINS).floor().clamp(0, BINS - 1).nan_to_num(0).long()
    counts = torch.zeros(BINS, dtype=dtype, device=g.device).scatter_add_(0, index, finite.to(dtype))
    stats = torch.stack(
        [lo, hi, finite.sum().to(dtype), values.sum(), (values * values).sum(), (~finite).sum().to(dtype)]
    )
    return torch.cat([stats, counts])


def to_histogram(row: list[float]) -> Histogram:
    """One fetched table row as a ``Histogram``."""
    lo, hi, count, total, squares, nonfinite = row[:6]
    return Histogram(lo, hi, int(count), total, squares, int(nonfinite), tuple(int(c) for c in row[6:]))
