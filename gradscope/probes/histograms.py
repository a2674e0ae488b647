"""Gradient histograms, computed on the device without a host sync (fetched with the step's transfer).

Each histogram has ``BINS`` equal buckets between the finite minimum and
maximum of one gradient; non-finite entries are left out and counted.

The work is batched: the gradients of one device and dtype are laid end to end
in chunks of at most ``CHUNK`` entries (small gradients share a chunk, a large
one spans several), and each chunk costs the same dozen or so kernels however
many gradients it holds (segment reductions, one ``bincount`` for all their
buckets). A model with a thousand small tensors pays a few chunks, not a few
dozen kernels per tensor; temporaries stay a chunk's size. On the CPU, whose
values need no device sync to be read, the finite gradients take a faster path
(``gradscope.probes.cpu_histograms``): the same bucket arithmetic on same-shape
gradients stacked into rows, with no per-entry gather of each piece's bounds.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from gradscope.probes.base import Probe, StepContext
from gradscope.probes.cpu_histograms import BINS, WIDTH, cpu_histograms
from gradscope.probes.gradients import to_local
from gradscope.report import Histogram, StepRecord
from gradscope.report.tables import HistogramTable, histogram_of

CHUNK = 1 << 18  # entries per chunk
_INF = float("inf")


def gradient_histograms(grads: list[torch.Tensor], shards: Any = None) -> torch.Tensor:
    """A ``(len(grads), WIDTH)`` float64 table (float32 on MPS), one row per gradient.

    Args:
        grads: the gradients (local shards under FSDP).
        shards: FSDP: a ``distributed.Ranks``; the buckets then span each whole gradient's range
            and the counts are summed over the ranks.
    """
    if not grads:
        return torch.zeros((0, WIDTH), dtype=torch.float64)
    if shards is None and grads[0].device.type == "cpu":
        return cpu_histograms(grads, _chunked)
    return _chunked(grads, shards)


def _chunked(grads: list[torch.Tensor], shards: Any = None) -> torch.Tensor:
    """``gradient_histograms`` of any gradients on one device, in chunks (see the module's docstring)."""
    home = grads[0].device
    dtype = torch.float32 if home.type == "mps" else torch.float64
    chunks = _chunks([g.detach().reshape(-1) for g in grads])
    bounds = torch.full((len(grads), 2), _INF, dtype=dtype, device=home)  # each row's min and -max
    for chunk in chunks:
        rows = chunk.rows.to(home)[:, None].expand(-1, 2)
        bounds.scatter_reduce_(0, rows, _bounds(chunk, chunk.values()).to(home, dtype), "amin")
    if shards is not None:
        bounds = shards.reduce_min(bounds)
    some = bounds[:, 0] <= -bounds[:, 1]
    lo, hi = torch.where(some, bounds[:, 0], 0.0), torch.where(some, -bounds[:, 1], 0.0)  # none finite: [0, 0]
    table = torch.zeros((len(grads), WIDTH - 2), dtype=dtype, device=home)
    for chunk in chunks:
        rows = chunk.rows.to(home)
        table.index_add_(0, rows, _sums(chunk, lo[rows].to(chunk.device), hi[rows].to(chunk.device)).to(home, dtype))
    if shards is not None:
        table = shards.reduce_sum(table).to(dtype)
    return torch.cat([lo[:, None], hi[:, None], table], dim=1)


class _Chunk:
    """Pieces of gradients end to end; ``rows[k]`` is the table row of piece ``k``."""

    def __init__(self, pieces: list[tuple[int, torch.Tensor]]) -> None:
        self.pieces = [p for _, p in pieces]
        self.count = len(pieces)
        self.device = self.pieces[0].device
        # bfloat16 and float16 entries are bucketed in float32, whose steps are finer than theirs.
        self.dtype = torch.promote_types(self.pieces[0].dtype, torch.float32)
        self.lengths = torch.tensor([p.numel() for p in self.pieces], device=self.device)
        self.rows = torch.tensor([row for row, _ in pieces], device=self.device)

    def values(self) -> torch.Tensor:
        """The chunk's entries, (entries,) (a copy only when they are several pieces or half precision)."""
        flat = torch.cat(self.pieces) if self.count > 1 else self.pieces[0]
        return flat.to(self.dtype)

    def each(self, per_piece: torch.Tensor, entries: int) -> torch.Tensor:
        """A per-piece value for each entry of its piece: (entries,), or (1,) to broadcast."""
        if self.count == 1:
            return per_piece
        return torch.repeat_interleave(per_piece, self.lengths, output_size=entries)

    def reduce(self, values: torch.Tensor, how: str, initial: float) -> torch.Tensor:
        """One value per piece, (pieces,), in a single kernel however many pieces there are."""
        if self.count == 1:
            if not values.numel():
                return values.new_full((1,), initial)
            return {"min": values.amin, "max": values.amax, "sum": values.sum}[how]().reshape(1)
        return torch.segment_reduce(values, how, lengths=self.lengths, initial=initial)


def _chunks(flat: list[torch.Tensor]) -> list[_Chunk]:
    """The gradients cut into chunks of at most ``CHUNK`` entries, per (device, dtype)."""
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for row, f in enumerate(flat):
        pieces = [f[at : at + CHUNK] for at in range(0, f.numel(), CHUNK)] or [f]
        groups[(f.device, f.dtype)].extend((row, p) for p in pieces)
    chunks = []
    for pieces in groups.values():
        run: list[tuple[int, torch.Tensor]] = []
        size = 0
        for row, piece in pieces:
            if run and size + piece.numel() > CHUNK:
                chunks.append(_Chunk(run))
                run, size = [], 0
            run.append((row, piece))
            size += piece.numel()
        chunks.append(_Chunk(run))
    return chunks


def _bounds(chunk: _Chunk, values: torch.Tensor) -> torch.Tensor:
    """Each piece's smallest finite entry and minus its largest (inf, inf when there is none): (pieces, 2)."""
    low = chunk.reduce(values.nan_to_num(_INF, _INF, _INF), "min", _INF)
    high = chunk.reduce(values.nan_to_num(-_INF, -_INF, -_INF), "max", -_INF)
    return torch.stack([low, -high], dim=1)


def _sums(chunk: _Chunk, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(pieces, WIDTH - 2): finite count, sum, sum of squares, non-finite count and bucket counts
    of each piece, given its row's bounds ``lo`` and ``hi`` (pieces,)."""
    values = chunk.values()
    entries = values.numel()
    lo, hi = lo.to(chunk.dtype), hi.to(chunk.dtype)
    # Finite even for a one-valued gradient (hi == lo), whose entries all land in bucket 0.
    scale = BINS / (hi - lo).clamp_min(BINS * torch.finfo(chunk.dtype).tiny)
    # Each piece has BINS + 1 slots: slot 0 counts its NaN and Inf entries (which the arithmetic keeps
    # non-finite, so no isfinite pass is needed), slots 1..BINS its buckets.
    slot = torch.sub(values, chunk.each(lo, entries)).mul_(chunk.each(scale, entries)).floor_()  # one temporary
    slot = slot.nan_to_num_(-1.0, -1.0, -1.0).clamp_(-1, BINS - 1).add_(1).int()  # int32: half the bytes of int64
    if chunk.count > 1:
        slot += chunk.each(torch.arange(0, chunk.count * (BINS + 1), BINS + 1, device=chunk.device), entries)
    counts = torch.bincount(slot, minlength=chunk.count * (BINS + 1)).reshape(chunk.count, BINS + 1)
    counts = counts.to(lo.dtype)
    finite = values.nan_to_num(0.0, 0.0, 0.0)
    total = chunk.reduce(finite, "sum", 0.0).to(lo.dtype)
    squares = chunk.reduce(finite.mul_(finite), "sum", 0.0).to(lo.dtype)  # in place: ``finite`` is a copy
    count = counts[:, 1:].sum(dim=1)
    stats = torch.stack([count, total, squares, counts[:, 0]], dim=1)
    return torch.cat([stats, counts[:, 1:]], dim=1)


def to_histogram(row: list[float]) -> Histogram:
    """One fetched table row as a ``Histogram``."""
    return histogram_of(row)


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
        return {"histograms": HistogramTable(self._names, values, WIDTH)}
