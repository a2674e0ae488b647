"""Activation checkpointing of the modules a config names, undone when the run ends."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradscope.errors import ConfigError


@contextlib.contextmanager
def checkpointing(model: nn.Module, patterns: list[str]) -> Iterator[list[str]]:
    """Run the modules whose qualified names match ``patterns`` under activation checkpointing.

    Each matching module's ``forward`` is wrapped in
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` for the
    duration of the block and restored afterwards, also on error. Modules
    inside an already-checkpointed module are left alone.

    Yields:
        The qualified names of the checkpointed modules.

    Raises:
        ConfigError: a pattern matches no module.
    """
    chosen = _matching_modules(model, patterns)
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for _, module in chosen:
            patched.append((module, module.__dict__.get("forward")))
            module.forward = _checkpointed(module.forward)  # type: ignore[method-assign]
        yield [name for name, _ in chosen]
    finally:
        for module, original in patched:
            if original is None:
                del module.forward
            else:
                module.forward = original  # type: ignore[method-assign]


def _matching_modules(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Module]]:
    names = [name for name, _ in model.named_modules() if name]
    for i, pattern in enumerate(patterns):
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(
                [(f"checkpointing.modules[{i}]", f"pattern {pattern!r} matches no module; modules are: {sample}")]
            )
    chosen: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(parent + ".") for parent, _ in chosen)
        if name and not inside and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            chosen.append((name, module))
    return chosen


def _checkpointed(forward: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
