"""Which in-place op changed a tensor that backward needed, and which module's node had saved it.

Used only on a step whose backward raised: the forward is replayed under a
``TorchFunctionMode`` that records every op that changes a tensor in place
(its ``_version`` moves), with the node the tensor came from before, and the
backward is replayed with a pre-hook on every node, so the node that was
running when PyTorch raised is known. PyTorch's message names the modified
tensor by its shape, the node it is an output of and the version it expected:
that picks the in-place op out of the records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch.overrides import TorchFunctionMode

from gradscope.locate.forward_origin import version_of
from gradscope.locate.origins import describe_site, is_metadata, module_name, op_name
from gradscope.probes.modules import ModuleTracker
from gradscope.utils.frames import user_site
from gradscope.utils.tensors import tensors_in

# "...modified by an inplace operation: [torch.FloatTensor [16, 32]], which is output 0 of
# SigmoidBackward0, is at version 1; expected version 0 instead."
_MODIFIED = re.compile(
    r"\[(?P<type>[\w.]+) \[(?P<shape>[\d, ]*)\]\](?:, which is output \d+ of (?P<node>\w+))?,"
    r" is at version (?P<now>\d+); expected version (?P<expected>\d+)"
)


@dataclass(frozen=True)
class InplaceWrite:
    """One op that changed a tensor in place during the forward."""

    op: str
    module: str | None  # None: outside every module (the loss)
    source: str | None
    shape: tuple[int, ...]
    node: str | None  # the node the tensor was an output of before the op (None: a leaf)
    version: int  # the tensor's version before the op
    grad_fn: Any = None  # that node itself, to match against the node that failed


class InplaceWrites(TorchFunctionMode):
    """Records, while entered, every op that changes a floating tensor in place (``writes``), and
    the nodes of ops that ran outside every module (``loss_nodes``)."""

    def __init__(self, tracker: ModuleTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.writes: list[InplaceWrite] = []
        self.loss_nodes: set[Any] = set()  # nodes of the ops that ran outside every module

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if is_metadata(func):
            return func(*args, **kwargs)
        inputs = [t for t in tensors_in([args, kwargs]) if t.is_floating_point()]
        before = [(t, version_of(t), t.grad_fn) for t in inputs]
        out = func(*args, **kwargs)
        if self.tracker.current is None:
            self.loss_nodes.update(t.grad_fn for t in tensors_in(out) if t.grad_fn is not None)
        for t, version, node in before:
            if version_of(t) != version:
                where = self.tracker.current
                self.writes.append(
                    InplaceWrite(
                        op=op_name(func),
                        module=module_name(where, self.tracker),
                        source=describe_site(user_site()),
                        shape=tuple(t.shape),
                        node=type(node).__name__ if node is not None else None,
                        version=version,
                        grad_fn=node,
                    )
                )
        return out


def culprit(writes: list[InplaceWrite], message: str, failing: Any = None) -> InplaceWrite | None:
    """The write that changed the tensor PyTorch's ``message`` names (None: not an in-place error,
    or no recorded write matches).

    Args:
        writes: the forward's in-place writes.
        message: what backward raised.
        failing: the node that raised: the tensor it saved is its own output (a sigmoid or a ReLU
            saves its result) or one of its inputs (a product saves its factors).
    """
    found = _MODIFIED.search(message)
    if found is None:
        return None
    shape = tuple(int(n) for n in found["shape"].replace(" ", "").split(",") if n)
    expected = int(found["expected"])
    matches = [w for w in writes if w.shape == shape and w.version == expected]
    # PyTorch names the node by its forward op (``Sigmoid``) or in full (``ReluBackward0``).
    by_node = [w for w in matches if found["node"] is None or (w.node or "").startswith(found["node"])]
    near = {failing, *(child for child, _ in failing.next_functions)} if failing is not None else set()
    saved = [w for w in by_node if w.grad_fn is not None and w.grad_fn in near]
    chosen = saved or by_node or matches
    return chosen[0] if chosen else None


class RunningNode:
    """Pre-hooks on every node of a graph: ``last`` is the node backward ran last (the failing one,
    when backward raised). Use as a context manager around the backward."""

    def __init__(self, nodes: list[Any]) -> None:
        self.nodes = nodes
        self.last: Any = None
        self._handles: list[Any] = []

    def __enter__(self) -> RunningNode:
        for node in self.nodes:
            self._handles.append(node.register_prehook(self._ran(node)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _ran(self, node: Any) -> Any:
        def hook(grad_outputs: tuple[Any, ...]) -> None:
            self.last = node

        return hook
