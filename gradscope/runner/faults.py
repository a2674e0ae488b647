"""Models with one deliberate fault each, for the example configs under ``configs/faults/``.

Each is small and named after what goes wrong; gradscope should report the
fault at the place marked ``# fault`` and nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

from gradscope.runner.zoo import MLP


class LogBlock(nn.Module):
    """Linear then log: NaN wherever the linear output is negative."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.linear(x))  # fault: log of negative values is NaN


class NanInForward(nn.Module):
    """A ReLU MLP whose block ``fault_at`` takes a log (NaN in the forward pass)."""

    def __init__(self, width: int = 32, depth: int = 4, fault_at: int = 2, classes: int = 10) -> None:
        super().__init__()
        blocks = [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)]
        blocks[fault_at] = LogBlock(width)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class SqrtWhere(nn.Module):
    """``where(h > 0, sqrt(h), 0)``: finite forward, but sqrt's gradient at the discarded negatives is NaN."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        return torch.where(h > 0, torch.sqrt(h), torch.zeros_like(h))  # fault: NaN gradient through the unused branch


class NanInBackward(nn.Module):
    """A finite forward whose backward makes NaN in block ``fault_at``."""

    def __init__(self, width: int = 32, depth: int = 4, fault_at: int = 1, classes: int = 10) -> None:
        super().__init__()
        blocks = [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)]
        blocks[fault_at] = SqrtWhere(width)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class Exp(torch.autograd.Function):
    """exp with a hand-written backward that forgets to clamp like the forward does."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x.clamp(max=10.0))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x) * (x < 10.0)  # fault: exp(x) overflows to inf, and inf * 0 is NaN


class CustomFunctionNan(nn.Module):
    """Uses the ``Exp`` autograd.Function on a pre-activation scaled so some entries overflow exp."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.gate = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.head(Exp.apply(self.gate(h) * 1000.0))


class Cube(torch.autograd.Function):
    """x**3 with a wrong hand-written derivative."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * 2 * x**2  # fault: d(x^3)/dx is 3x^2


class WrongGradient(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(Cube.apply(self.inp(x)))


class InplaceAfterSigmoid(nn.Module):
    """Scales a sigmoid's output in place, destroying the value its backward needs."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.inp(x))
        h.mul_(2.0)  # fault: sigmoid's backward needs its unmodified output
        return self.head(h)


class UnusedAndDetached(nn.Module):
    """``aux_head`` is never called; ``encoder``'s output reaches the loss only through ``.detach()``."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.encoder = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)
        self.aux_head = nn.Linear(width, classes)  # fault: never used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.encoder(x)).detach()  # fault: cuts encoder off from the loss
        return self.head(features)


class ScaledOutput(MLP):
    """An MLP whose logits are multiplied by ``scale``: too large overflows fp16 gradients, too small underflows."""

    def __init__(self, scale: float = 1.0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale  # fault: the scale sets every gradient's magnitude


def log_loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A hand-written loss that takes the log of raw logits instead of probabilities."""
    picked = output.gather(1, labels[:, None])
    return -torch.log(picked).mean()  # fault: logits can be negative; log of them is NaN
