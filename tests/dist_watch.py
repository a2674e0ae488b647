"""A user's own DDP/FSDP2 training loop under ``gradscope.watch`` (run by torchrun in the tests).

Usage: dist_watch.py STRATEGY OUT.json [POISON_ROW]; STRATEGY is ddp, fsdp or single (one process,
the whole batch). Rank 0 (or the single process) writes the report.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

import gradscope
from tests.dist_models import GatedMLP, batch


def main(strategy: str, out: str, poison: int | None) -> None:
    torch.manual_seed(0)
    model = GatedMLP()
    x, y = batch(rows=8, poison=poison)
    rank = 0
    if strategy != "single":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        if strategy == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer, logdir=out + ".tb", histograms_every=1) as scope:
        for _ in range(2):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            optimizer.step()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(scope.report.to_dict(), f)
    if strategy != "single":
        dist.barrier()  # FSDP2 on gloo can abort a rank that leaves while another still runs
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
