"""From a closed ledger and the model's state to the report's plain numbers: per-module sums up the
tree, what checkpointing each candidate must keep, and the bytes of the parameters, gradients and
optimizer state by dtype; and which modules are candidates for checkpointing."""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from gradscope.errors import ConfigError
from gradscope.probes.memory_ledger import Key, Ledger, storage_of
from gradscope.report.memory import ModuleMemory
from gradscope.utils.tensors import tensors_in


def repeated_blocks(model: nn.Module) -> list[str]:
    """The blocks of the model's repeated module lists: children of an ``nn.ModuleList`` or
    ``nn.Sequential`` that share their class with a sibling (a transformer's layers, a ResNet
    stage's blocks), outermost lists only."""
    out: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or any(name.startswith(o + ".") for o in out):
            continue
        children = list(module.named_children())
        kinds = defaultdict(int)
        for _, child in children:
            kinds[type(child)] += 1
        prefix = f"{name}." if name else ""
        out += [prefix + n for n, c in children if kinds[type(c)] > 1 and len(list(c.children()))]
    return out


def named_candidates(model: nn.Module, patterns: Sequence[str], key: str = "memory.candidates") -> list[str]:
    """The modules matching each pattern (fnmatch over qualified names).

    Raises:
        ConfigError: a pattern that matches no module, with its key path.
    """
    names = [name for name, _ in model.named_modules() if name]
    out: list[str] = []
    for i, pattern in enumerate(patterns):
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError([(f"{key}[{i}]", f"pattern {pattern!r} matches no module; modules are: {sample}")])
        out += [n for n in matched if n not in out]
    return out


def module_table(ledger: Ledger) -> dict[str, ModuleMemory]:
    """Every module that ran (and every ancestor of one that saved), with inclusive sums."""
    own: dict[str, int] = defaultdict(int)
    for entry in ledger.saved.values():
        own[entry.module] += entry.nbytes
    inclusive: dict[str, int] = defaultdict(int)
    for name, nbytes in own.items():
        for ancestor in _ancestors(name):
            inclusive[ancestor] += nbytes
    names = sorted(set(ledger.order) | set(inclusive), key=lambda n: ledger.order.get(n, len(ledger.order)))
    return {
        name: ModuleMemory(
            saved_bytes=inclusive.get(name, 0),
            own_bytes=own.get(name, 0),
            type=ledger.types.get(name, ""),
            order=ledger.order.get(name, -1),
            keeps_bytes=keeps(ledger, name) if name in ledger.candidates else None,
            flops=ledger.module_flops.get(name) if name in ledger.candidates and ledger.counter is not None else None,
            forward_s=round(ledger.module_time[name], 6) if name in ledger.module_time else None,
            checkpointed=name in ledger.checkpointed,
            candidate=name in ledger.candidates,
        )
        for name in names
    }


def keeps(ledger: Ledger, module: str) -> int:
    """What stays saved if ``module`` is checkpointed: its inputs (saved already, or held by the
    checkpoint though nothing saved them), and the storages inside it that modules outside it save too."""
    inside = lambda name: name == module or name.startswith(module + ".") or not module  # noqa: E731
    inputs = ledger.inputs.get(module, {})
    total = 0
    for key, entry in ledger.saved.items():
        if inside(entry.module) and (key in inputs or not all(inside(s) for s in entry.savers)):
            total += entry.nbytes
    unsaved = {k: n for k, n in inputs.items() if k not in ledger.saved and k not in ledger.state_keys}
    return total + sum(unsaved.values())


def _ancestors(name: str) -> Iterable[str]:
    yield name
    while name:
        name = name.rpartition(".")[0]
        yield name


def by_dtype(tensors: Iterable[torch.Tensor]) -> dict[str, int]:
    """Bytes of the distinct storages of ``tensors``, by dtype."""
    seen: set[Key] = set()
    out: dict[str, int] = defaultdict(int)
    for tensor in tensors:
        found = storage_of(tensor)
        if found is None or found[0] in seen:
            continue
        seen.add(found[0])
        out[str(tensor.dtype).removeprefix("torch.")] += found[1]
    return dict(out)


def state_bytes(model: nn.Module) -> dict[str, int]:
    """The parameters' and buffers' bytes, by dtype."""
    return by_dtype([*model.parameters(), *model.buffers()])


def gradient_bytes(model: nn.Module) -> dict[str, int]:
    """The gradients the parameters hold now, by dtype."""
    return by_dtype(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_bytes(optimizer: Any) -> dict[str, int] | None:
    """The optimizer's state tensors, by dtype (None: no state yet, as before Adam's first step)."""
    state = getattr(optimizer, "state", None)
    if not state:
        return None
    return by_dtype(tensors_in([dict(s) for s in state.values()]))


def saved_by_dtype(ledger: Ledger) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for entry in ledger.saved.values():
        out[entry.dtype] += entry.nbytes
    return dict(out)
