"""A user's own model, batch and loss, as configs/custom_model.yaml names them."""

import torch
from torch import nn


class TwoTower(nn.Module):
    """Two encoders called on two inputs; one encoder is used twice (shared weights)."""

    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.head = nn.Linear(hidden, 1)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(left) * self.encoder(right)).squeeze(-1)


def make_batch(rows: int = 16, dim: int = 16) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Keyword inputs and regression targets."""
    left, right = torch.randn(rows, dim), torch.randn(rows, dim)
    return {"left": left, "right": right}, (left * right).sum(-1)


def huber(output: torch.Tensor, labels: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    return nn.functional.huber_loss(output, labels, delta=delta)
