"""Which module is running: a stack of qualified module names kept by global module hooks.

Used while gradscope looks at a forward pass op by op (activation statistics,
localising a NaN): every op can be attributed to the innermost module running
it, and every autograd node to the module call that created it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils.hooks import RemovableHandle

from gradscope.utils.tensors import tensors_in


class ModuleTracker:
    """Tracks the running module of ``model`` while entered.

    Attributes:
        stack: ``(name, call)`` of the modules running, innermost last.
        calls: how many times each module has been called.
        node_module: autograd node -> ``(name, call)`` of the module call that created it
            (filled only with ``claim_nodes=True``).
    """

    def __init__(self, model: nn.Module, claim_nodes: bool = False) -> None:
        self.names = {id(m): name for name, m in model.named_modules()}
        self.claim_nodes = claim_nodes
        self.stack: list[tuple[str, int]] = []
        self._inputs: list[set[Any]] = []  # per running call: grad_fns of its inputs (made before it)
        self.calls: Counter[str] = Counter()
        self.node_module: dict[Any, tuple[str, int]] = {}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> ModuleTracker:
        self.reset()
        self._handles = [
            register_module_forward_pre_hook(self._enter_module),
            register_module_forward_hook(self._leave_module),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.stack.clear()

    def reset(self) -> None:
        """Forget the calls seen so far (a new step)."""
        self.stack.clear()
        self._inputs.clear()
        self.calls.clear()
        self.node_module.clear()

    @property
    def current(self) -> tuple[str, int] | None:
        """The innermost running module of the model, or None outside it."""
        return self.stack[-1] if self.stack else None

    def _enter_module(self, module: nn.Module, args: Any) -> None:
        name = self.names.get(id(module))
        if name is not None and not in_backward():
            self.calls[name] += 1
            self.stack.append((name, self.calls[name]))
            if self.claim_nodes:
                self._inputs.append({t.grad_fn for t in tensors_in(args) if t.grad_fn is not None})

    def _leave_module(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self.names.get(id(module))
        if name is None or not self.stack or in_backward():
            return
        owner = self.stack.pop()
        if self.claim_nodes:
            self._claim(output, owner, self._inputs.pop())

    def _claim(self, output: Any, owner: tuple[str, int], before: set[Any]) -> None:
        # Nodes created during this call (between its inputs and its outputs) and not
        # claimed by an inner module belong to it.
        pending = [t.grad_fn for t in tensors_in(output) if t.grad_fn is not None]
        seen: set[Any] = set()
        while pending:
            node = pending.pop()
            if node is None or node in seen or node in before:
                continue
            seen.add(node)
            self.node_module.setdefault(node, owner)
            pending.extend(child for child, _ in node.next_functions)


def in_backward() -> bool:
    """Whether a backward pass is running (where checkpointed modules recompute their forward)."""
    return torch._C._current_graph_task_id() != -1


def describe_call(name: str, call: int, total: int) -> str:
    """``blocks.0`` or, for a module called several times, ``blocks.0 (call 2 of 3)``."""
    return name if total <= 1 else f"{name} (call {call} of {total})"
