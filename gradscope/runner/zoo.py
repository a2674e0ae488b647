"""Small built-in models for the example configs (``target: gradscope.zoo:mlp``).

The lower-case names (``mlp``, ``cnn``, ``resnet``, ``transformer_lm``, ``lstm``) are what configs use.

Each is a plain ``nn.Module`` of the kind people train, small enough to run in
seconds on a CPU, with the knobs (activation, init, depth, residual, norm) that
make its gradients healthy or not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
}
INITS = ("default", "kaiming", "xavier", "normal", "zeros")


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def _init_linear(layer: nn.Linear, init: str, std: float) -> None:
    if init == "default":
        return
    if init == "kaiming":
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    elif init == "xavier":
        nn.init.xavier_normal_(layer.weight)
    elif init == "normal":
        nn.init.normal_(layer.weight, std=std)
    elif init == "zeros":
        nn.init.zeros_(layer.weight)
    else:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    nn.init.zeros_(layer.bias)


class MLPBlock(nn.Module):
    """Linear -> (norm) -> activation, optionally as a residual ``x + f(x)``."""

    def __init__(self, width: int, activation: str, norm: bool, residual: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else None
        self.linear = nn.Linear(width, width)
        self.act = _activation(activation)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) if self.norm is not None else x
        h = self.act(self.linear(h))
        return x + h if self.residual else h


class MLP(nn.Module):
    """``depth`` hidden blocks between an input and an output projection."""

    def __init__(
        self,
        in_features: int = 64,
        hidden: int = 64,
        depth: int = 4,
        classes: int = 10,
        activation: str = "relu",
        init: str = "default",
        init_std: float = 0.02,
        norm: bool = False,
        residual: bool = False,
        bias: float | None = None,
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, activation, norm, residual) for _ in range(depth))
        self.out = nn.Linear(hidden, classes)
        for block in self.blocks:
            _init_linear(block.linear, init, init_std)
            if bias is not None:
                nn.init.constant_(block.linear.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


mlp = MLP


class CNN(nn.Module):
    """Conv-act-pool twice, then a linear classifier. Input: (B, C, H, W)."""

    def __init__(self, in_channels: int = 3, width: int = 16, classes: int = 10, activation: str = "relu") -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            _activation(activation),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            _activation(activation),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


cnn = CNN


class ResidualBlock(nn.Module):
    """The ResNet basic block: conv-BN-ReLU-conv-BN plus a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet-style CNN with BatchNorm: a stem, stages of basic blocks, a linear head."""

    def __init__(
        self, in_channels: int = 3, width: int = 16, stages: tuple[int, ...] | list[int] = (2, 2), classes: int = 10
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks: list[nn.Module] = []
        cin = width
        for i, count in enumerate(stages):
            cout = width * 2**i
            for j in range(count):
                blocks.append(ResidualBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


resnet = ResNet


class Attention(nn.Module):
    """Causal multi-head self-attention."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    """A GPT-style pre-LN language model. Input (B, T) token ids -> logits (B, T, vocab)."""

    def __init__(
        self,
        vocab: int = 512,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        max_len: int = 64,
        mlp_ratio: int = 4,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        if tie_weights:
            self.lm_head.weight = self.tok.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                # GPT-2's scaled init of residual projections keeps the stream's variance flat.
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)  # (B, T, d_model)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


transformer_lm = TransformerLM


class LSTMClassifier(nn.Module):
    """Embedding -> LSTM -> linear head on the last position. Input (B, T) token ids."""

    def __init__(self, vocab: int = 256, embed: int = 32, hidden: int = 64, layers: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(idx))  # (B, T, hidden)
        return self.head(out[:, -1])


lstm = LSTMClassifier
