"""Real libraries' models (random weights, nothing downloaded) set up as their recipes run them, and
faulty variants of them ported from bug reports; named by config targets (``<this file>:name``)."""

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB, LENGTH = 64, 8


def tokens(batch_size: int = 2) -> dict:
    """The ``data:`` section for these language models: token ids, labels = inputs (HF shifts them)."""
    return {"batch_size": batch_size, "input": {"tokens": {"vocab": VOCAB, "length": LENGTH}}, "labels": "input"}


def gpt2(checkpointing: str = "none") -> nn.Module:
    """A 2-layer GPT-2 from ``GPT2Config``; ``checkpointing``: ``none``, ``reentrant`` or ``non_reentrant``
    (Hugging Face's ``gradient_checkpointing_enable``)."""
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return _checkpointed(GPT2LMHeadModel(config), checkpointing)


def llama(checkpointing: str = "none") -> nn.Module:
    """A 2-layer Llama from ``LlamaConfig``; ``checkpointing`` as for ``gpt2``."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return _checkpointed(LlamaForCausalLM(config), checkpointing)


def _checkpointed(model: nn.Module, checkpointing: str) -> nn.Module:
    if checkpointing != "none":
        reentrant = checkpointing == "reentrant"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.config.use_cache = False
    return model.train()


class SqrtGate(nn.Module):
    """``where(x > 0, sqrt(x), 0)``: finite forward, NaN gradient where x < 0 (``sqrt``'s backward
    divides by ``sqrt(x)``, ``where`` multiplies the unselected side by 0: ``0 * inf``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x.sqrt(), torch.zeros_like(x))


def gpt2_sqrt_gate(checkpointing: str = "reentrant") -> nn.Module:
    """GPT-2 whose second block's MLP activation is a ``SqrtGate`` (pytorch/pytorch#68425, #36923:
    ``torch.where`` backpropagates NaN from the branch it did not take)."""
    model = gpt2(checkpointing)
    model.transformer.h[1].mlp.act = SqrtGate()
    return model


def compiled_gpt2_sqrt_gate() -> nn.Module:
    """The same fault in a ``torch.compile``d GPT-2 (``eager`` backend: no C++ compiler needed)."""
    return torch.compile(gpt2_sqrt_gate("none"), backend="eager")


class NeedsAutocast(nn.Module):
    """A model written for autocast only: it refuses to run without it (as code that asserts a
    half-precision dtype does), so an fp32 replay of its step cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled("cpu"):
            raise RuntimeError("this model runs under autocast only")
        return self.out(torch.relu(self.inp(x)))
