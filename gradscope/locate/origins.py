"""Where a NaN or Inf first appears in the backward (the autograd node), and what finding it shares
with the forward's search (``forward_origin``): op names, source lines, counts.

Runs only on a step where the loss or a gradient was seen to be non-finite:
the step's forward and backward are replayed on the same weights, batch and
random state, checking every op's output (forward) and every autograd node's
output gradients (backward), which costs a host sync per op and is why it is
not done on every step.
"""

from __future__ import annotations

import inspect
import linecache
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gradscope.probes.modules import ModuleTracker, describe_call
from gradscope.report import NonfiniteOrigin
from gradscope.utils.frames import MODEL_FILES, PACKAGE_DIR, TORCH_DIR

ROOT = "(model)"  # how the top-level module is named in messages


def backward_origin(
    loss: torch.Tensor,
    inputs: list[torch.Tensor],
    tracker: ModuleTracker,
    ops: dict[Any, tuple[str, str | None]],
    kind: str,
    loss_nodes: frozenset[Any] | set[Any] = frozenset(),
) -> NonfiniteOrigin | None:
    """Replay backward from ``loss``; the first autograd node whose incoming gradients are free of
    ``kind`` (nan/inf) but whose outgoing ones are not.

    Args:
        loss: the replayed forward's loss.
        inputs: the parameters to differentiate (their ``.grad`` is not touched).
        tracker: the tracker that claimed the forward's nodes for modules.
        ops: node -> (op name, source line) recorded in the forward.
        kind: ``nan`` or ``inf``.
        loss_nodes: the nodes of ops that ran outside every module (the loss): a gradient they
            make is the loss's (phase ``loss``), not that of the last module that ran.
    """
    found: list[NonfiniteOrigin] = []

    def hook(node: Any) -> Callable[..., None]:
        def check(grad_inputs: tuple[Any, ...], grad_outputs: tuple[Any, ...]) -> None:
            if found or not any(_has(g, kind) for g in grad_inputs if isinstance(g, torch.Tensor)):
                return
            if any(_has(g, kind) for g in grad_outputs if isinstance(g, torch.Tensor)):
                return  # it only passed on what it received
            found.append(_node_origin(node, grad_inputs, tracker, ops, kind, loss_nodes))

        return check

    handles = [node.register_hook(hook(node)) for node in graph_nodes(loss.grad_fn)]
    try:
        torch.autograd.grad(loss, inputs, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _node_origin(
    node: Any,
    grads: tuple[Any, ...],
    tracker: ModuleTracker,
    ops: dict[Any, tuple[str, str | None]],
    kind: str,
    loss_nodes: frozenset[Any] | set[Any],
) -> NonfiniteOrigin:
    bad = next(g for g in grads if isinstance(g, torch.Tensor) and _has(g, kind))
    owner = owner_of(node, tracker, loss_nodes)
    op, source = ops.get(node, (None, None))
    forward_cls = getattr(type(node), "_forward_cls", None)  # a custom autograd.Function
    if forward_cls is not None:
        op = f"{forward_cls.__qualname__}.backward"
        source = _function_source(forward_cls.backward)
    return NonfiniteOrigin(
        phase="loss" if owner is LOSS_OWNER else "backward",
        kind=kind,
        op=op or node.name(),
        node=node.name(),
        module=None if owner is LOSS_OWNER else module_name(owner, tracker),
        source=source,
        dtype=str(bad.dtype).removeprefix("torch."),
        count=int(count_nonfinite(bad, kind)),
        numel=bad.numel(),
    )


LOSS_OWNER = ("", -1)  # owner_of's answer for a node of the loss, made outside every module


def owner_of(node: Any, tracker: ModuleTracker, loss_nodes: frozenset[Any] | set[Any]) -> tuple[str, int] | None:
    """The module call that created ``node`` (``LOSS_OWNER``: an op outside every module); unclaimed
    nodes (inside composite ops) take the owner of the nearest known node they feed into."""
    pending, seen = [node], set()
    while pending:
        current = pending.pop(0)
        if current is None or current in seen:
            continue
        seen.add(current)
        if current in tracker.node_module:
            return tracker.node_module[current]
        if current in loss_nodes:
            return LOSS_OWNER
        pending.extend(child for child, _ in current.next_functions)
    return None


def graph_nodes(root: Any) -> list[Any]:
    """Every autograd node reachable from ``root``."""
    nodes, pending, seen = [], [root], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        pending.extend(child for child, _ in node.next_functions)
    return nodes


def rows_with(t: torch.Tensor, kind: str, batch: int | None) -> tuple[int, ...]:
    """The batch rows of ``t`` that hold ``kind`` (nan/inf), when its first dimension is the batch's."""
    if batch is None or t.dim() == 0 or t.shape[0] != batch:
        return ()
    bad = t.detach().isnan() if kind == "nan" else t.detach().isinf()
    return tuple(int(i) for i in bad.reshape(batch, -1).any(dim=1).nonzero().flatten().tolist())


def nonfinite_tensors(named: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """``name -> (NaN count, Inf count)`` of the tensors that hold any (syncs once per tensor)."""
    out = {}
    for name, t in named.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            out[name] = (int(t.isnan().sum()), int(t.isinf().sum()))
    return out


def op_name(func: Any) -> str:
    """``torch.log``, ``F.softmax``, ``Tensor.relu``: the name a user would write."""
    name = getattr(func, "__name__", None) or str(func)
    module = getattr(func, "__module__", "") or ""
    qual = getattr(func, "__qualname__", name)
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    if "Tensor" in qual or module == "torch._tensor" or getattr(func, "__objclass__", None) is torch._C.TensorBase:
        return f"Tensor.{name}"
    return f"torch.{name}"


def module_name(where: tuple[str, int] | None, tracker: ModuleTracker) -> str | None:
    if where is None:
        return None
    name, call = where
    return describe_call(name or ROOT, call, tracker.calls[name])


def describe_site(site: tuple[str, int, str] | None) -> str | None:
    if site is None:
        return None
    filename, line, function = site
    text = linecache.getline(filename, line).strip()
    return f"{filename}:{line} in {function}" + (f": {text}" if text else "")


def _function_source(fn: Any) -> str | None:
    try:
        filename = inspect.getsourcefile(fn)
        _, line = inspect.getsourcelines(fn)
    except (OSError, TypeError):
        return None
    return f"{filename}:{line} in {getattr(fn, '__qualname__', 'backward')}"


def _has(t: torch.Tensor, kind: str) -> bool:
    if not t.is_floating_point() or t.numel() == 0 or not allocated(t):
        return False
    return bool(t.isnan().any()) if kind == "nan" else bool(t.isinf().any())


# FSDP gathers parameters into uninitialised buffers inside the modules' calls: not the model's ops.
_DISTRIBUTED = str(Path(TORCH_DIR) / "distributed")
# Frames that only pass an op on: torch's own, and gradscope's other modes (the activation probe).
_PASSING = (TORCH_DIR, PACKAGE_DIR)


def called_by_distributed() -> bool:
    """The op was called by ``torch.distributed`` (FSDP's hooks and copies), not by the model: a
    ``torch.distributed`` frame comes before the first frame of the model's code."""
    frame: Any = sys._getframe(2)  # 0: here, 1: __torch_function__, 2: whoever called the op
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_DISTRIBUTED):
            return True
        if not filename.startswith(_PASSING) or filename in MODEL_FILES:
            return False
        frame = frame.f_back
    return False


def allocated(t: torch.Tensor) -> bool:
    """False for a tensor whose storage was freed (FSDP frees gathered parameters after use)."""
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        return True  # a subclass (DTensor) checks through its own ops
    try:
        return t.untyped_storage().nbytes() > 0
    except RuntimeError:
        return True  # no plain storage (functional tensors): read through ops as usual


def count_nonfinite(t: torch.Tensor, kind: str) -> torch.Tensor:
    return t.isnan().sum() if kind == "nan" else t.isinf().sum()


def explicit_inf(args: Any, kwargs: Any) -> bool:
    scalars = [a for a in list(args) + list(kwargs.values()) if isinstance(a, float)]
    return any(math.isinf(a) or math.isnan(a) for a in scalars)


_METADATA = {"size", "dim", "shape", "dtype", "device", "numel", "is_floating_point", "__get__", "stride", "data_ptr"}


def is_metadata(func: Any) -> bool:
    return getattr(func, "__name__", "") in _METADATA
