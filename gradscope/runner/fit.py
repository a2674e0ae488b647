"""Data that does not fit the model: token ids beyond its embedding, sequences longer than its
position table, and labels that equal the inputs for a loss that does not shift them.

An embedding lookup out of range raises a bare ``IndexError: index out of range in self`` at the
library's line; ``overflow`` turns it into a config error that names the input, its largest id or
its length, and the table it overflowed. ``advice`` says what a valid config probably did not mean.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradscope.config import Settings
from gradscope.errors import ConfigError

EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
POSITION_WORDS = ("pos", "wpe")  # position tables: position_embeddings, pos_emb, wpe, embed_positions


def advice(settings: Settings) -> list[tuple[str, str]]:
    """``(key path, warning)`` for a config that is valid but probably not what was meant."""
    labels = settings.data.labels
    if labels is not None and labels.name == "input" and settings.loss.name == "cross_entropy":
        return [
            (
                "data.labels",
                "`input` with loss cross_entropy scores each position on its own token (the built-in loss does "
                "not shift labels): the model learns to copy its input. For a language model use labels: "
                "next_token, or loss: output with a model that shifts labels itself (transformers' *ForCausalLM)",
            )
        ]
    return []


def where(settings: Settings, key: str) -> str:
    """``file.yaml:7: `` for a key path of the config (its nearest parent the YAML gives a line for)."""
    source, lines = settings.origin.source, settings.origin.lines
    path = key
    while path and path not in lines:
        path = path.rpartition(".")[0]
    return f"{source}{f':{lines[path]}' if path else ''}: " if source else ""


def overflow(model: nn.Module, inputs: Any, exc: BaseException, synthetic: bool) -> ConfigError | None:
    """The config error an embedding lookup's ``IndexError`` stands for, or None when no integer
    input is out of any embedding's range (the IndexError is then the model's own).

    Args:
        model: the model that raised.
        inputs: the batch's inputs (tensor, tuple or dict).
        exc: what the forward raised.
        synthetic: the batch came from ``data.input.tokens`` (else from ``data.target``).
    """
    if not isinstance(exc, IndexError):
        return None
    tables = [(name, m.num_embeddings) for name, m in model.named_modules() if isinstance(m, EMBEDDINGS)]
    if not tables:
        return None
    for where, t in _integer_inputs(inputs):
        top = int(t.max())
        token = max(tables, key=lambda item: item[1])
        if top >= token[1]:
            key = "data.input.tokens.vocab" if synthetic else "data.target"
            return ConfigError([(key, _ids(where, t, top, token, "its largest embedding"))])
        length = t.shape[-1] if t.ndim >= 2 else t.shape[0]
        positions = [(n, rows) for n, rows in tables if rows < length and any(w in n.lower() for w in POSITION_WORDS)]
        if positions:
            name, rows = positions[0]
            key = "data.input.tokens.length" if synthetic else "data.target"
            return ConfigError(
                [
                    (
                        key,
                        f"the sequences in {where} are {length} tokens long, but the position table {name} holds {rows} "
                        f"positions (nn.Embedding({rows}, ...)), so the lookup of position {rows} raised "
                        f"IndexError: make the sequences at most {rows} long, or build the model with more positions",
                    )
                ]
            )
        small = [(n, rows) for n, rows in tables if rows <= top]
        if small:
            key = "data.input.tokens.vocab" if synthetic else "data.target"
            return ConfigError([(key, _ids(where, t, top, small[0], "an embedding"))])
    return None


def _ids(where: str, t: torch.Tensor, top: int, table: tuple[str, int], which: str) -> str:
    name, rows = table
    beyond = int((t >= rows).sum())
    return (
        f"the token ids in {where} go up to {top} ({beyond} of {t.numel()} ids are {rows} or more), but {which}, "
        f"{name}, has {rows} rows (nn.Embedding({rows}, ...)), so the lookup raised IndexError: keep the ids below "
        f"{rows} (vocab: {rows}), or build the model with a vocabulary of at least {top + 1}"
    )


def _integer_inputs(inputs: Any, where: str = "") -> list[tuple[str, torch.Tensor]]:
    """Each integer tensor of the inputs with where it sits (``input_ids``, ``[0]``, ``inputs``)."""
    if isinstance(inputs, torch.Tensor):
        integer = not inputs.is_floating_point() and not inputs.is_complex() and inputs.dtype != torch.bool
        return [(where or "the inputs", inputs)] if integer and inputs.numel() else []
    if isinstance(inputs, dict):
        return [pair for key, value in inputs.items() for pair in _integer_inputs(value, f"{where}{key}")]
    if isinstance(inputs, (tuple, list)):
        return [pair for i, value in enumerate(inputs) for pair in _integer_inputs(value, f"{where}[{i}]")]
    return []
