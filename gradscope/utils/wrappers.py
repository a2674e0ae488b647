"""The user's module inside the wrappers that run it: DDP, ``torch.compile``, and any other a
training library adds (register it with ``register_unwrapper``); the torch optimizer inside a
trainer's optimizer wrapper.

The report names parameters and modules as the user's module does, hooks that name modules
watch it, and replays run on it (locally: outside DDP's all-reduce).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

Unwrapper = Callable[[nn.Module], nn.Module | None]  # the wrapped module, or None: not this wrapper


def _ddp(model: nn.Module) -> nn.Module | None:
    # A model ``accelerate`` prepared is the user's own module (its ``forward`` wrapped in autocast)
    # or a DDP around it, so this covers it too.
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else None


# Wrappers that run the user's module as it is; tried in turn until none applies.
UNWRAPPERS: list[Unwrapper] = [_ddp]


def register_unwrapper(unwrapper: Unwrapper) -> None:
    """Teach ``unwrap`` another wrapper (a training library's)."""
    if unwrapper not in UNWRAPPERS:
        UNWRAPPERS.append(unwrapper)


def unwrap(model: nn.Module, compiled: bool = False) -> nn.Module:
    """The user's module inside every known wrapper.

    Args:
        model: the model as trained.
        compiled: also step inside ``torch.compile`` (whose module shares the user's parameters
            but runs compiled: hooks on it see the compiled calls).
    """
    while True:
        inner = next((found for found in (u(model) for u in UNWRAPPERS) if found is not None), None)
        if inner is None and compiled and is_compiled(model):
            inner = model._orig_mod
        if inner is None:
            return model
        model = inner


def unwrap_optimizer(optimizer: Any) -> tuple[Any, Any]:
    """The torch optimizer inside a trainer's wrapper, and the grad scaler the wrapper steps it with.

    ``accelerate``'s ``AcceleratedOptimizer`` keeps it as ``.optimizer`` (and its scaler as
    ``.scaler``), Lightning's ``LightningOptimizer`` as ``._optimizer``. A wrapper is not a
    ``torch.optim.Optimizer`` with step hooks of its own, so gradscope hooks the optimizer inside.

    Returns:
        ``(optimizer, scaler)``; the scaler is None when the wrapper has none.
    """
    scaler = None
    while optimizer is not None and not hasattr(optimizer, "_optimizer_step_pre_hooks"):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            break
        scaler = scaler or getattr(optimizer, "scaler", None)
        optimizer = inner
    return optimizer, scaler


def is_compiled(model: nn.Module) -> bool:
    """A ``torch.compile``'d module (an ``OptimizedModule`` around the user's)."""
    return hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule"


def model_name(model: nn.Module) -> str:
    """The class name of the user's model (``fully_shard`` renames it ``FSDP<name>``)."""
    cls = type(unwrap(model, compiled=True))
    if len(cls.__bases__) == 2 and cls.__bases__[0].__name__ == "FSDPModule":  # class FSDP<name>(FSDPModule, <name>)
        cls = cls.__bases__[1]
    return cls.__name__
