"""gradscope across processes: DDP and FSDP2 under torchrun, on PyTorch's own process group.

Every rank runs the same instrumented steps on its own slice of the batch and
computes the same report:

- DDP: the statistics are those of the all-reduced gradients; a comm hook also
  takes each rank's own per-parameter gradient norms before the all-reduce, so
  the rank where a NaN started, or whose gradients stand out, can be named.
- FSDP2 (``fully_shard``): each rank reduces its local shards and the rows are
  all-reduced (sum of squares for norms, max for max |g|, sums for counts), so the
  numbers equal the unsharded ones without gathering any parameter.
- Per step, each rank's loss and local gradient norms are all-gathered into the
  step's one host transfer; where a NaN was made is searched on every rank at
  once and the first rank that found it is reported.

Rank 0 writes the outputs. Exit codes agree across ranks. Wrapping the model and slicing the batch
are in ``parallel``; a rank that stopped because another failed is ``errors.RankFailure``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradscope.errors import ConfigError, peer_failed
from gradscope.probes.gradients import is_sharded
from gradscope.report.rows import GRAD_MAX_ABS, GRAD_NORM, PARAM_NORM

_LAUNCH = "torchrun --nproc_per_node=N -m gradscope inspect CONFIG --distributed {}"


@dataclass
class Ranks:
    """This process's place in the group, and the collectives the probes need.

    Attributes:
        rank, world: this process's rank and the number of processes.
        strategy: ``ddp`` or ``fsdp``.
        device: where collectives take their tensors (the rank's GPU with NCCL, the CPU with gloo).
        owned: gradscope started the process group and ends it.
    """

    rank: int
    world: int
    strategy: str
    device: torch.device
    owned: bool = False

    @property
    def backend(self) -> str:
        return str(dist.get_backend())

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "world_size": self.world, "backend": self.backend}

    # --- collectives ------------------------------------------------------------------------

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (1-D), stacked in rank order: ``(world, n)``."""
        local = _own(tensor.detach().reshape(-1), self.device)
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local)
        return torch.stack(out)

    def reduce_rows(self, table: torch.Tensor, extra_norm: float | None) -> torch.Tensor:
        """Per-parameter rows of local shards -> rows of the whole parameters (no parameter gathered)."""
        sums = _own(table, self.device)
        for column in (GRAD_NORM, PARAM_NORM):
            sums[:, column] = sums[:, column].square()
        if extra_norm is not None:
            sums[:, -1] = sums[:, -1].pow(extra_norm)
        maxima = _own(table[:, GRAD_MAX_ABS], self.device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        out = sums
        for column in (GRAD_NORM, PARAM_NORM):
            out[:, column] = out[:, column].sqrt()
        if extra_norm is not None:
            out[:, -1] = out[:, -1].pow(1.0 / extra_norm)
        out[:, GRAD_MAX_ABS] = maxima  # the non-zero counts (GRAD_NONZERO) are summed as they are
        return out

    def reduce_exact(self, rows: torch.Tensor) -> torch.Tensor:
        """The float64 rows (norm, finite max |g|, NaNs, Infs) of local shards -> whole parameters."""
        sums = _own(rows, self.device)
        sums[:, 0] = sums[:, 0].square()
        maxima = _own(rows[:, 1], self.device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        sums[:, 0] = sums[:, 0].sqrt()
        sums[:, 1] = maxima
        return sums

    def reduce_dead_units(self, flags: torch.Tensor) -> torch.Tensor:
        """Per unit, dead on every rank (1.0) or alive somewhere (0.0)."""
        flags = _own(flags, self.device, torch.float32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        return flags

    def reduce_min(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = _own(tensor, self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = _own(tensor, self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def first_found(self, found: Any) -> tuple[int | None, Any]:
        """The lowest rank whose ``found`` is not None, and its value (every rank gets the same answer)."""
        everything: list[Any] = [None] * self.world
        dist.all_gather_object(everything, found)
        for rank, value in enumerate(everything):
            if value is not None:
                return rank, value
        return None, None

    def agree(self, code: int) -> int:
        """The highest exit code of all ranks."""
        value = torch.tensor([code], device=self.device)
        try:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        except Exception as exc:
            if peer_failed(exc):
                return code  # a rank stopped after its run: it reports for itself
            raise
        return int(value.item())

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def _own(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A contiguous copy for a collective to reduce in place: a view (a column of a table) would be
    reduced as the memory it starts at, and the caller's tensor overwritten."""
    return tensor.to(device, dtype, copy=True).contiguous()


def start(strategy: str, device: torch.device, timeout_s: float) -> Ranks:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    NCCL on CUDA (each rank on its ``LOCAL_RANK`` GPU), gloo on the CPU.

    Raises:
        ConfigError: not started by torchrun, or a device no backend serves.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            [
                (
                    "distributed",
                    f"`{strategy}` needs one process per rank, started by torchrun: {_LAUNCH.format(strategy)}",
                )
            ]
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError([("device", f"distributed runs need cpu (gloo) or cuda (NCCL), got {device.type!r}")])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
    return Ranks(dist.get_rank(), dist.get_world_size(), strategy, device, owned)


def joined(model: nn.Module) -> Ranks | None:
    """The ranks of a user's own DDP or FSDP2 model (``gradscope.watch``), or None when not distributed."""
    if not dist.is_initialized():
        return None
    if isinstance(model, nn.parallel.DistributedDataParallel):
        strategy = "ddp"
    elif any(is_sharded(p) for p in model.parameters()):
        strategy = "fsdp"
    else:
        return None
    param = next(model.parameters(), None)
    device = param.device if param is not None and dist.get_backend() == "nccl" else torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), strategy, device)
