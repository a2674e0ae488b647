"""The tensors inside a nested value: a model's inputs or outputs, a batch, a hook's arguments."""

from __future__ import annotations

from typing import Any

import torch


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value`` (tensors, tuples, lists, dicts, and the ``logits``/``loss``/
    ``last_hidden_state`` of a model-output object), depth first, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    for attr in ("logits", "loss", "last_hidden_state"):  # model-output objects (Hugging Face)
        inner = getattr(value, attr, None)
        if isinstance(inner, torch.Tensor):
            return [inner]
    return []
