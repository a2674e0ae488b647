"""Models and batches for the distributed tests (imported by torchrun'd processes through config targets)."""

from __future__ import annotations

import torch
from torch import nn


class Gate(nn.Module):
    """Scales by sqrt(x0 + 3): NaN for a sample whose first input feature is below -3."""

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return h * torch.sqrt(x[:, :1] + 3.0)


class GatedMLP(nn.Module):
    def __init__(self, width: int = 16, classes: int = 4, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth))
        self.gate = Gate()
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        for block in self.blocks:
            h = block(h)
        return self.head(self.gate(h, x))


def batch(
    rows: int = 8, width: int = 16, classes: int = 4, poison: int | None = None, scale_from: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with x0 in [-2, 2] (finite through the gate); row ``poison`` gets x0 = -10 (NaN);
    rows from ``scale_from`` on are 1000x larger (a mis-scaled shard)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=gen)
    x[:, 0] = x[:, 0].clamp(-2.0, 2.0)
    if poison is not None:
        x[poison, 0] = -10.0
    if scale_from is not None:
        x[scale_from:, 1:] *= 1000.0
    return x, torch.randint(classes, (rows,), generator=gen)


class RaisesOnPoison(GatedMLP):
    """Raises in forward for a batch that holds a poisoned row: on that rank only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] < -3).any()):
            raise ValueError("a poisoned row reached the model")
        return super().forward(x)


class StallsOnPoison(GatedMLP):
    """Stops answering for ``seconds`` on a batch that holds a poisoned row (a stuck rank)."""

    def __init__(self, seconds: float = 20.0) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] < -3).any()):
            import time

            time.sleep(self.seconds)
        return super().forward(x)
