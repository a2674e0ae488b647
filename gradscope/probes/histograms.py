"""Gradient histograms, computed on the device without a host sync (fetched with the step's transfer).

Each histogram has ``BINS`` equal buckets between the finite minimum and
maximum of one gradient; non-finite entries are left out and counted.
"""

from __future__ import annotations

from typing import Any

import torch

from gradscope.probes.base import Probe, StepContext
from gradscope.probes.gradients import to_local
from gradscope.report import Histogram, StepRecord

BINS = 30
WIDTH = 6 + BINS  # min, max, count, sum, sum of squares, non-finite count, then the bucket counts


def gradient_histograms(grads: list[torch.Tensor], shards: Any = None) -> torch.Tensor:
    """A ``(len(grads), WIDTH)`` float64 table (float32 on MPS), one row per gradient.

    Args:
        grads: the gradients (local shards under FSDP).
        shards: FSDP: a ``distributed.Ranks``; the buckets then span each whole gradient's range
            and the counts are summed over the ranks.
    """
    if not grads:
        return torch.zeros((0, WIDTH), dtype=torch.float64)
    flat = [g.detach().flatten() for g in grads]
    bounds = torch.stack([_finite_bounds(g) for g in flat])  # (n, 2): min, -max
    if shards is not None:
        bounds = shards.reduce_min(bounds)
    table = torch.stack([_row(g, lo, -neg_hi) for g, (lo, neg_hi) in zip(flat, bounds.to(flat[0].device).unbind())])
    if shards is not None:
        table = torch.cat([table[:, :2], shards.reduce_sum(table[:, 2:]).to(table.dtype)], dim=1)
    return table


def _dtype(g: torch.Tensor) -> torch.dtype:
    return torch.float32 if g.device.type == "mps" else torch.float64


def _finite_bounds(g: torch.Tensor) -> torch.Tensor:
    """The smallest finite entry and minus the largest (inf, inf when there is none)."""
    dtype = _dtype(g)
    finite = torch.isfinite(g)
    inf = torch.tensor(float("inf"), dtype=dtype, device=g.device)
    if not g.numel():
        return torch.stack([inf, inf])
    values = g.to(dtype)
    lo = torch.where(finite, values, inf).amin()
    hi = torch.where(finite, values, -inf).amax()
    return torch.stack([lo, -hi])


def _row(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    dtype = _dtype(g)
    finite = torch.isfinite(g)
    values = torch.where(finite, g, torch.zeros_like(g)).to(dtype)
    some = lo <= hi
    lo, hi = torch.where(some, lo, 0.0).to(dtype), torch.where(some, hi, 0.0).to(dtype)  # none finite: [0, 0]
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


class HistogramProbe(Probe):
    """Every ``every`` steps, a histogram of each gradient that arrived (``StepRecord.histograms``).

    Args:
        gradients: the watch's gradient probe (which parameters got a gradient, and their names).
        every: the steps whose index is a multiple of it get histograms.
        shards: FSDP: a ``distributed.Ranks`` (see ``gradient_histograms``).
    """

    name = "histograms"

    def __init__(self, gradients: Any, every: int, shards: Any = None) -> None:
        super().__init__()
        self.gradients, self.every, self.shards = gradients, every, shards
        self._names: list[str] = []

    def collect(self, step: StepContext) -> list[torch.Tensor]:
        self._names = []
        if step.index % self.every:
            return []
        probe = self.gradients
        named = [(probe.names[i], probe.params[i].grad) for i in probe.arrived()]
        named = [(n, g) for n, g in named if g is not None]
        self._names = [n for n, _ in named]
        return [gradient_histograms([to_local(g) for _, g in named], self.shards)]

    def contribute(self, values: list[float], record: StepRecord) -> dict[str, Any]:
        if not self._names:
            return {}
        return {"histograms": {n: to_histogram(values[i * WIDTH : (i + 1) * WIDTH]) for i, n in enumerate(self._names)}}
