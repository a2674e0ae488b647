"""Putting a model and a batch on the ranks of a distributed ``gradscope inspect`` run: DDP or
FSDP2 around the model, and each rank's slice of the batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gradscope.observe.distributed import Ranks


def wrap(model: nn.Module, ranks: Ranks) -> nn.Module:
    """DDP around ``model``, or ``fully_shard`` on each block of its module lists and on the root."""
    if ranks.strategy == "ddp":
        ids = [ranks.device.index] if ranks.device.type == "cuda" else None
        # gradscope repeats one step: a static graph lets DDP take parameters without a gradient (which
        # gradscope reports) without stopping the run or traversing the graph every step.
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _blocks(module: nn.Module) -> Iterator[nn.Module]:
    """The outermost ``ModuleList``/``Sequential`` elements that hold parameters: FSDP's usual units."""
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            yield from (m for m in child if any(True for _ in m.parameters()))
        else:
            yield from _blocks(child)


def shard(value: Any, rank: int, world: int, rows: int) -> Any:
    """Rank ``rank``'s contiguous slice (of ``rows // world`` rows) of every tensor in a batch."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] != rows:
            return value
        size = rows // world
        return value[rank * size : (rank + 1) * size]
    if isinstance(value, (tuple, list)):
        return type(value)(shard(v, rank, world, rows) for v in value)
    if isinstance(value, dict):
        return {k: shard(v, rank, world, rows) for k, v in value.items()}
    return value
