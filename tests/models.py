"""Test models with one property each, named by config targets (``<this file>:Name``)."""

import torch
from torch import nn


class WithUnused(nn.Module):
    """`spare` is never called; `frozen` does not require grad."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(8, 4)
        self.spare = nn.Linear(8, 4)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(self.frozen(x))


class Detached(nn.Module):
    """`cut`'s output is detached: it runs in forward but gets no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.cut = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.cut(x).detach())


class CalledTwice(nn.Module):
    """`shared` runs twice per forward: its gradient is the sum of both uses."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class Raises(nn.Module):
    def __init__(self, fail_in: str = "forward") -> None:
        super().__init__()
        if fail_in == "init":
            raise ValueError("bad width 7")
        self.fail_in = fail_in
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_in == "forward":
            raise RuntimeError("boom in forward")
        return self.lin(x)


class VectorLoss(nn.Module):
    """Returns a per-sample loss (not a scalar) for `loss: output`."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.lin(x).squeeze(-1)


class Lstm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.rnn = nn.LSTM(16, 32, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(x))
        return self.head(out[:, -1])


def not_a_module() -> int:
    return 3


class FailsOnCall(nn.Module):
    """Raises `error` on forward call number `call` (1-based); fine before that."""

    def __init__(self, call: int = 2, error: str = "RuntimeError") -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.call, self.error, self.calls = call, error, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.call:
            raise {"RuntimeError": RuntimeError, "KeyboardInterrupt": KeyboardInterrupt}[self.error]("stop here")
        return self.lin(x)
