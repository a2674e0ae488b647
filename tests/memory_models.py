"""Models for the memory ledger's tests (config targets ``tests.memory_models:<name>``), and an
independent count of what autograd saves: the test's own pack hook and module stack, and a walk of
the autograd graph's ``_saved_*`` tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def gpt2(n_layer: int = 3, checkpointing: str | None = None) -> nn.Module:
    """A tiny GPT-2 LM (its loss from ``labels``); ``checkpointing``: Hugging Face's, ``reentrant`` or ``plain``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=64, n_head=4, vocab_size=256, n_positions=64)
    model = GPT2LMHeadModel(config)
    _hf_checkpointing(model, checkpointing)
    return model


def llama(checkpointing: str | None = None) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    _hf_checkpointing(model, checkpointing)
    return model


def _hf_checkpointing(model: Any, mode: str | None) -> None:
    if mode is not None:
        model.gradient_checkpointing_enable({"use_reentrant": mode == "reentrant"})
    model.train()


def unet() -> nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


class Block(nn.Module):
    """conv-BN-ReLU twice (four times when ``double``) with a residual; ``width`` sets how much it saves."""

    def __init__(self, width: int, double: bool = False) -> None:
        super().__init__()
        layers = 4 if double else 2
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(layers))
        self.norms = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(conv(h))
            h = torch.relu(h) if i < len(self.convs) - 1 else h
        return torch.relu(x + h)


class Widening(nn.Module):
    """A CNN whose blocks differ in size: each stage doubles the channels at the same resolution;
    ``doubled``: the index (in ``blocks``) of a block that saves twice as much (four convs, not two)."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32), classes: int = 10, doubled: int | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, w in enumerate(widths):
            if i:
                blocks.append(Widen(widths[i - 1], w))
            blocks.append(Block(w, double=len(blocks) == doubled))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(torch.relu(self.stem(x))).mean(dim=(2, 3)))


class Widen(nn.Module):
    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(a, b, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def widening(doubled: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    return Widening(doubled=doubled)


# --- the independent count ------------------------------------------------------------------------


def _key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def count_saved(
    model: nn.Module, run: Callable[[], Any], keeping: Iterable[str] = ()
) -> tuple[dict[int, tuple[int, str]], Any]:
    """Run ``run()`` (a forward, and the loss) under a pack hook of this test's own: every storage
    saved, once, with the innermost module running at its first save; the storages of the modules
    named in ``keeping`` (checkpointed: their tensor inputs are kept for the recompute) added.

    Returns:
        ``{data_ptr: (nbytes, module)}`` without the parameters' and buffers' storages, and what
        ``run`` returned.
    """
    state = {_key(t)[0] for t in [*model.parameters(), *model.buffers()]}
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []
    kept = set(keeping)
    seen: dict[int, tuple[int, str]] = {}

    def add(t: torch.Tensor, module: str) -> None:
        ptr, nbytes = _key(t)
        if ptr not in state and ptr not in seen and nbytes:
            seen[ptr] = (nbytes, module)

    def pre(module: nn.Module, args: Any, kwargs: Any) -> None:
        if torch._C._current_graph_task_id() != -1:
            return
        name = names[id(module)]
        stack.append(name)
        if name in kept:
            for t in _tensors([args, kwargs]):
                add(t, name)

    def post(module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        if torch._C._current_graph_task_id() == -1 and stack:
            stack.pop()

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))

    def pack(t: torch.Tensor) -> torch.Tensor:
        add(t, stack[-1] if stack else "")
        return t.detach()

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = run()
    finally:
        for h in handles:
            h.remove()
    return seen, result


def graph_saved(loss: torch.Tensor, model: nn.Module) -> int:
    """Bytes of the distinct storages held by the ``_saved_*`` attributes of every node of the
    autograd graph behind ``loss`` (parameters and buffers left out): a second independent count."""
    state = {_key(t)[0] for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}
    nodes, visited = [loss.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                for t in _tensors(getattr(node, attr)):
                    ptr, nbytes = _key(t)
                    # A Python number an op was given (x * 0.5) reads back as a new 0-dim double each
                    # (or int64) each time: autograd keeps the number, not a tensor, so no pack hook sees it.
                    wrapped = t.dim() == 0 and t.dtype in (torch.float64, torch.int64) and t.device.type == "cpu"
                    if ptr not in state and not wrapped:
                        seen[ptr] = nbytes
        if hasattr(node, "saved_tensors"):  # custom autograd.Functions
            for t in node.saved_tensors:
                ptr, nbytes = _key(t)
                if ptr not in state:
                    seen[ptr] = nbytes
        nodes.extend(n for n, _ in node.next_functions)
    return sum(seen.values())


def inclusive(seen: dict[int, tuple[int, str]], module: str) -> int:
    """Bytes attributed to ``module`` or a module inside it."""
    return sum(n for n, m in seen.values() if not module or m == module or m.startswith(module + "."))


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []
