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


class LogOnSecondCall(nn.Module):
    """`shared` is called twice; only its second call takes a log of negatives."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = LogIfAsked()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(self.shared(x, log=False), log=True))


class LogIfAsked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, log: bool) -> torch.Tensor:
        h = self.lin(x)
        return torch.log(h) if log else h


def nan_batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(8, 8)
    x[3, 2] = float("nan")
    return x, torch.randint(4, (8,))


class MaskedAttention(nn.Module):
    """Self-attention with a -inf causal mask written by masked_fill (healthy), or a fully masked row (NaN)."""

    def __init__(self, mask_all_first_row: bool = False) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 4)
        self.mask_all_first_row = mask_all_first_row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(8, dim=-1)
        scores = q @ k.transpose(-1, -2)  # (B, T, T)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        if self.mask_all_first_row:
            mask[0] = True
        scores = scores.masked_fill(mask, float("-inf"))
        return self.head((torch.softmax(scores, dim=-1) @ v).mean(1))


class SeparateKeyBias(nn.Module):
    """Attention with its own key bias: q.b_k is constant along each softmax row, so its gradient is ~0."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), dim=-1)
        return self.head((att @ self.v(x)).mean(1))


class FunctionalRelu(nn.Module):
    """Two ReLUs called functionally; biases of -100 kill every unit."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)
        for lin in (self.a, self.b):
            nn.init.constant_(lin.bias, -100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.relu(self.a(x))
        h = self.b(h + x).relu()
        return self.head(h + x)


class Fp16Overflow(nn.Module):
    """A linear whose outputs exceed float16's 65504 under fp16 autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.big.weight.mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.big(x))


class LogOfScale(nn.Module):
    """Scales each row's output by the log of its first input: a row whose first input is negative is NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * torch.log(x[:, :1])


class UnitRows(nn.Module):
    """Divides each row by its norm: an all-zero row is 0 / 0."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x / torch.linalg.vector_norm(x, dim=-1, keepdim=True))


def rows_batch(fault: str, rows: tuple[int, ...] = (2, 5), batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive inputs; the given rows made negative (``log``) or zero (``zero``)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 8, generator=gen) + 0.5
    for row in rows:
        x[row] = -x[row] if fault == "log" else 0.0
    return x, torch.randint(4, (batch,), generator=gen)
