"""Models for the flow and activation rules: zero-initialised partners, gates, sparse codes,
ReLUs in every spelling (config targets ``<this file>:Name``)."""

import torch
import torch.nn.functional as F
from torch import nn


class ReZero(nn.Module):
    """ReZero (Bachlechner et al. 2020): x + alpha * f(x) with each alpha starting at 0."""

    def __init__(self, width: int = 16, depth: int = 4, classes: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)) for _ in range(depth)
        )
        self.alphas = nn.Parameter(torch.zeros(depth))
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for alpha, block in zip(self.alphas, self.blocks):
            x = x + alpha * block(x)
        return self.out(x)


class ZeroGatedBlock(nn.Module):
    """A residual block whose branch ends in a gate that starts at zero (ReZero inside the block)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate * self.fc2(F.relu(self.fc1(x)))


class ZeroInitResidual(nn.Module):
    """torchvision's ``zero_init_residual=True``: the last BatchNorm gain of each branch starts at 0."""

    def __init__(self, width: int = 8, depth: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(self._block(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    @staticmethod
    def _block(width: int) -> nn.Sequential:
        bn = nn.BatchNorm2d(width)
        nn.init.zeros_(bn.weight)
        return nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            bn,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = F.relu(x + block(x))
        return self.head(x.mean(dim=(2, 3)))


class GatedStack(nn.Module):
    """Residual blocks whose branches end in zero-initialised gates."""

    def __init__(self, width: int = 16, depth: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(ZeroGatedBlock(width) for _ in range(depth))
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


class ClosedGate(nn.Module):
    """A branch behind sigmoid(-60) ~ 1e-26: its gradient is rounding-level, never exactly zero, and
    the gate's own gradient is as small, so nothing opens it (a starved branch, not a partner)."""

    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.branch = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.gate = nn.Parameter(torch.tensor(-60.0))
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        return self.out(x + torch.sigmoid(self.gate) * self.branch(x))


class SparseCode(nn.Module):
    """A wide ReLU layer with a low firing density (a sparse code): each unit fires on ~2% of the
    samples, so ~70% of the units are silent in a batch of 16 by design."""

    def __init__(self, width: int = 1024, classes: int = 4, threshold: float = 2.0) -> None:
        super().__init__()
        self.enc = nn.Linear(8, width)
        nn.init.normal_(self.enc.weight, std=8**-0.5)  # pre-activations ~ N(0, 1)
        nn.init.constant_(self.enc.bias, -threshold)
        self.dec = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.relu(self.enc(x)))


class ClampRelus(nn.Module):
    """ReLUs spelled as clamps and ReLU6, each after a layer whose bias kills every unit."""

    def __init__(self, width: int = 16, classes: int = 4, bias: float = -100.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8 if i == 0 else width, width) for i in range(5))
        for layer in self.layers:
            nn.init.constant_(layer.bias, bias)
        self.relu6 = nn.ReLU6()
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers[0](x).clamp(min=0)
        h = torch.clamp_min(self.layers[1](h + 1), 0)
        h = self.layers[2](h + 1).clamp_min(0)
        h = F.relu6(self.layers[3](h + 1))
        h = self.relu6(self.layers[4](h + 1))
        return self.out(h + 1)


class SummedLoss(nn.Module):
    """A small MLP for a loss reduced by ``sum`` (the gradients scale with the batch)."""

    def __init__(self, width: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def summed_cross_entropy(output: torch.Tensor, labels: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Cross-entropy summed over the batch, times ``scale``."""
    return F.cross_entropy(output, labels, reduction="sum") * scale
