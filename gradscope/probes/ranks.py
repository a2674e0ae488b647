"""Each rank's own view of a distributed step: its loss and (DDP) its gradients before the all-reduce.

A DDP comm hook takes each parameter's local gradient norm on the device before DDP's
all-reduce; at each measured step every rank's loss and norms are all-gathered on the device
and join the step's one host transfer, to become one ``RankStep`` per rank.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import nn

from gradscope.probes.base import Probe, StepContext
from gradscope.probes.reductions import l2_norms
from gradscope.report import RankStep, StepRecord, stats

# A DDP model takes one comm hook for its lifetime: the hook gradscope registered on each model,
# kept here (not on the model) for the next watch of the same model to reuse.
_REGISTERED: weakref.WeakKeyDictionary[nn.Module, LocalGradients] = weakref.WeakKeyDictionary()


class LocalGradients:
    """DDP comm hook: each parameter's local gradient norm before the all-reduce, on the device.

    After gradscope is done with the model, the hook only does DDP's default all-reduce.
    """

    def __init__(self, params: list[torch.Tensor], device: torch.device) -> None:
        self.index = {id(p): i for i, p in enumerate(params)}
        self.norms = torch.zeros(len(params), device=device)
        self.active = True
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}  # per bucket layout, made once (a copy to the GPU)

    def rows(self, positions: list[int]) -> torch.Tensor:
        """The positions as an index tensor on the device, cached: DDP's buckets keep their layout."""
        key = tuple(positions)
        if key not in self._rows:
            self._rows[key] = torch.tensor(positions, device=self.norms.device)
        return self._rows[key]

    @classmethod
    def attach(cls, model: nn.parallel.DistributedDataParallel, params: list[torch.Tensor]) -> LocalGradients | None:
        """The model's hook (registered on first use); None when the model has a comm hook of its own."""
        existing = _REGISTERED.get(model)
        if existing is not None:
            existing.index = {id(p): i for i, p in enumerate(params)}
            existing._rows.clear()
            existing.active = True
            return existing
        param = next(model.parameters())
        local = cls(params, param.device)
        try:
            model.register_comm_hook(local, _local_then_allreduce)
        except RuntimeError:
            return None  # the user registered a comm hook already
        _REGISTERED[model] = local
        return local


def _local_then_allreduce(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks the annotations
    """Record the bucket's local gradient norms, then DDP's own all-reduce (an average)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    if state.active:
        pairs = [
            (state.index[id(p)], g) for p, g in zip(bucket.parameters(), bucket.gradients()) if id(p) in state.index
        ]
        if pairs:
            rows = state.rows([i for i, _ in pairs])
            norms = l2_norms([g.detach() for _, g in pairs]).to(state.norms.device)
            state.norms.index_copy_(0, rows, norms)
    return allreduce_hook(None, bucket)  # type: ignore[arg-type]


class RankViews(Probe):
    """``StepRecord.ranks`` (and the loss over the whole batch: the mean of the ranks' losses).

    Args:
        ranks: the run's ``distributed.Ranks``.
        model: the model as trained (a DDP model gets the comm hook).
        params: the watched parameters, in the gradient probe's order.
        names: their names.
        notes: where to say what cannot be seen.
    """

    name = "ranks"

    def __init__(self, ranks: Any, model: nn.Module, params: list[torch.Tensor], names: list[str], notes: list[str]):
        super().__init__()
        self.ranks, self.model, self.params, self.names, self.notes = ranks, model, params, names, notes
        self.local: LocalGradients | None = None
        self._loss_known = False

    def attach(self) -> None:
        if self.ranks.strategy != "ddp" or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return
        self.local = LocalGradients.attach(self.model, self.params)
        if self.local is None:
            self.notes.append("the DDP model has a comm hook of its own: each rank's own gradients are not seen")
            return
        self._handles.callback(setattr, self.local, "active", False)

    def collect(self, step: StepContext) -> list[torch.Tensor]:
        """Every rank's loss and (DDP) its own gradient norms, gathered on the device: ``(world, 1 + parameters)``."""
        self._loss_known = step.loss is not None
        device = self.ranks.device
        unknown = torch.full((1,), math.nan, device=device)  # made on the device: no copy, no sync
        own = [step.loss.detach().double().reshape(1).to(device) if step.loss is not None else unknown]
        if self.local is not None:
            own.append(self.local.norms.double().to(device))
        return [self.ranks.gather(torch.cat(own))]

    def contribute(self, values: list[float], record: StepRecord) -> dict[str, Any]:
        ranks = rank_steps(values, self.ranks.world, self.names, self._loss_known)
        losses = [r.loss for r in ranks if r.loss is not None]
        mean = math.fsum(losses) / len(losses) if losses else None  # the loss over the whole batch
        return {"ranks": ranks, "loss": mean}


def rank_steps(values: list[float], world: int, names: list[str], loss_known: bool) -> tuple[RankStep, ...]:
    """The fetched ``(world, 1 + parameters)`` rows as one ``RankStep`` per rank (``names``: the parameters)."""
    width = len(values) // world
    out = []
    for rank in range(world):
        row = values[rank * width : (rank + 1) * width]
        norms = row[1:]
        bad = tuple(names[i] for i, n in enumerate(norms) if not math.isfinite(n))
        grad_norm = stats.combine_norms(norms) if norms else None
        out.append(RankStep(rank, row[0] if loss_known else None, grad_norm, bad))
    return tuple(out)
