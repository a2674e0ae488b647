"""The ledger of one forward: each storage autograd saves for backward, once, by its full size,
attributed to the innermost module running when it was first saved.

A ``saved_tensors_hooks`` pack hook sees every tensor autograd saves while the ledger is open
(outermost default hooks only: inside a non-reentrant checkpoint the checkpoint's own hooks
replace it, which is what checkpointing keeps out of memory). It records the tensor's untyped
storage (a saved view keeps its whole storage alive) and hands autograd an alias of the same
tensor: no copy, no sync (``detach()`` rather than the tensor itself, which for a saved output
would make a reference cycle through its ``grad_fn`` that outlives a graph dropped without backward),
with the tensor's version: autograd checks a saved tensor for in-place changes only when no hooks
packed it, so the unpack hook does that check itself.

What a checkpoint keeps instead, its inputs (positional ones saved through the pack hook; keyword
ones held by the checkpoint's closure), is added for the module that ran under it. A reentrant
checkpoint runs its function under ``no_grad`` inside ``CheckpointFunction.forward``: a module
entered there (``checkpoint(block, x)`` runs the block's hooks inside it) finds that frame and
names the module the checkpoint runs; one whose hooks ran outside is found by its output's node.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointFunction

from gradscope.utils.tensors import tensors_in

# A storage: (data pointer, device type); its bytes and dtype.
Key = tuple[int, str]


@dataclass
class Saved:
    """One storage in the ledger."""

    nbytes: int
    dtype: str
    module: str  # attributed to (first saver, or the checkpointed module keeping it)
    savers: set[str] = field(default_factory=set)  # every module that saved or kept it
    kept_input: str | None = None  # a checkpointed module that keeps it as its input


def storage_of(tensor: torch.Tensor) -> tuple[Key, int] | None:
    """The tensor's storage key and full size in bytes (None: no storage to count)."""
    local = getattr(tensor, "_local_tensor", None)  # a DTensor (FSDP2) holds its shard in a local tensor
    if isinstance(local, torch.Tensor):
        tensor = local
    try:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0 or tensor.device.type == "meta":
            return None
        return (storage.data_ptr(), tensor.device.type), nbytes
    except (RuntimeError, NotImplementedError):  # sparse, nested or wrapper subclasses without one
        return None


class Ledger:
    """Records one forward's saved storages; open it with ``open()``, close with ``close()``.

    Args:
        model: the user's module; its parameters' and buffers' storages are counted apart.
        candidates: qualified names whose forward FLOPs and time are measured.
        flops: a ``FlopCounterMode`` entered while the ledger is open (None: no FLOPs).
    """

    def __init__(self, model: nn.Module, candidates: set[str], flops: Any = None) -> None:
        self.names = {id(m): name for name, m in model.named_modules()}
        self.types = {name: type(m).__name__ for name, m in model.named_modules()}
        self.candidates = candidates
        self.counter = flops
        self.state_keys: dict[Key, int] = {}
        for t in [*model.parameters(), *model.buffers()]:
            found = storage_of(t)
            if found is not None:
                self.state_keys[found[0]] = found[1]
        self.saved: dict[Key, Saved] = {}
        self.saved_state: dict[Key, int] = {}  # parameters'/buffers' storages autograd saved
        self.stack: list[str] = []
        self.order: dict[str, int] = {}
        self.checkpointed: set[str] = set()
        self.module_flops: dict[str, int] = defaultdict(int)
        self.module_time: dict[str, float] = defaultdict(float)
        self._starts: list[tuple[float, int]] = []
        self._regions: set[int] = set()  # checkpoint hooks and nodes already counted ...
        self._held: list[Any] = []  # ... held until the ledger closes, so that their ids stay theirs
        self.inputs: dict[str, dict[Key, int]] = {}  # candidates' tensor inputs (what checkpointing keeps)
        self.inputs_bytes = 0
        self.active = False
        self.backward_started = False  # a saved tensor was unpacked: no later forward joins the ledger
        self.started = 0.0
        self.duration = 0.0
        self.total_flops: int | None = None

    # --- the pack hook -------------------------------------------------------------------------

    def pack(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.active:
            self._record(tensor, self.stack[-1] if self.stack else None)
        return tensor.detach(), tensor._version

    def unpack(self, packed: tuple[torch.Tensor, int]) -> torch.Tensor:
        self.backward_started = True
        alias, version = packed
        if alias._version != version:  # autograd checks this itself only for tensors saved without hooks
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: [{alias.type()} {list(alias.shape)}] is at version {alias._version}; expected "
                f"version {version} instead."
            )
        return alias

    def _record(self, tensor: torch.Tensor, module: str | None, kept_by: str | None = None) -> None:
        found = storage_of(tensor)
        if found is None:
            return
        key, nbytes = found
        if key in self.state_keys:
            self.saved_state[key] = nbytes
            return
        where = module if module is not None else ""  # outside every module: the loss, under the root
        entry = self.saved.get(key)
        if entry is None:
            entry = self.saved[key] = Saved(nbytes, str(tensor.dtype).removeprefix("torch."), where)
            if module is None:
                entry.savers.add("<outside>")
        entry.savers.add(where)
        if kept_by is not None:
            entry.kept_input = kept_by
            if entry.module == _parent(kept_by):  # saved by the checkpoint just before its module ran
                entry.module = kept_by

    # --- module hooks --------------------------------------------------------------------------

    def enter(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        name = self.names.get(id(module))
        if not self.active or name is None or in_backward():
            return
        self._checkpoint_region(module, name)
        if not torch.is_grad_enabled():
            self._reentrant_region()
        self.order.setdefault(name, len(self.order))
        self.stack.append(name)
        if name in self.candidates:
            self.inputs.setdefault(name, dict(filter(None, map(storage_of, tensors_in((args, kwargs))))))
            flops = self.counter.get_total_flops() if self.counter is not None else 0
            self._starts.append((time.perf_counter(), flops))

    def leave(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        name = self.names.get(id(module))
        if not self.active or name is None or not self.stack or self.stack[-1] != name:
            return
        if name in self.candidates and self._starts:
            started, flops = self._starts.pop()
            self.module_time[name] += time.perf_counter() - started
            if self.counter is not None:
                self.module_flops[name] += self.counter.get_total_flops() - flops
        self._reentrant(name, output)
        self.stack.pop()

    def _checkpoint_region(self, module: nn.Module, name: str) -> None:
        """A non-reentrant checkpoint's hooks on top: its inputs are what it keeps."""
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        pack = top[0] if top else None
        if pack is None or getattr(pack, "__self__", None) is self or id(pack) in self._regions:
            return
        self._regions.add(id(pack))
        self._held.append(pack)
        if "_checkpoint_hook" not in getattr(pack, "__qualname__", ""):
            return  # some other saved-tensor hooks (save_on_cpu): not counted
        inputs, owner = _checkpoint_inputs(pack)
        parent = self.stack[-1] if self.stack else ""
        owner_name = self.names.get(id(owner)) if owner is not None else None
        keeper = owner_name if owner_name is not None else parent
        self.checkpointed.add(keeper)
        for tensor in inputs:
            self._record(tensor, keeper, kept_by=keeper)

    def _reentrant_region(self) -> None:
        """Inside a reentrant checkpoint's forward: its inputs are what it keeps, for the module it runs."""
        frame = _reentrant_frame()
        if frame is None:
            return
        node = frame.f_locals.get("ctx")  # the checkpoint's own node (``CheckpointFunctionBackward``)
        if node is None or id(node) in self._regions:
            return
        self._regions.add(id(node))
        self._held.append(node)
        owner, held = _function_owner(frame.f_locals.get("run_function"))
        keeper = self.names.get(id(owner)) if owner is not None else None
        keeper = keeper if keeper is not None else (self.stack[-1] if self.stack else "")
        self.checkpointed.add(keeper)
        for tensor in tensors_in([frame.f_locals.get("args", ()), held]):
            self._record(tensor, keeper, kept_by=keeper)

    def _reentrant(self, name: str, output: Any) -> None:
        """A reentrant checkpoint (``CheckpointFunction``) made this module's output: what it keeps."""
        for tensor in tensors_in(output):
            node = tensor.grad_fn
            if node is None or type(node).__name__ != "CheckpointFunctionBackward" or id(node) in self._regions:
                continue
            self._regions.add(id(node))
            self._held.append(node)
            self.checkpointed.add(name)
            function = getattr(node, "run_function", None)
            held = [*getattr(function, "args", ()), *getattr(function, "keywords", {}).values()]
            for kept in [*tensors_in(held), *_saved_of(node)]:
                self._record(kept, name, kept_by=name)

    # --- the window ----------------------------------------------------------------------------

    def open(self) -> None:
        self.active = True
        self.started = time.perf_counter()

    def close(self) -> None:
        if self.active:
            self.duration += time.perf_counter() - self.started
            self.total_flops = self.counter.get_total_flops() if self.counter is not None else None
        self.active = False
        self.stack.clear()
        self._starts.clear()
        self._held.clear()


def _saved_of(node: Any) -> list[torch.Tensor]:
    try:
        return list(node.saved_tensors)
    except RuntimeError:  # already freed
        return []


def _checkpoint_inputs(pack: Any) -> tuple[list[torch.Tensor], nn.Module | None]:
    """The tensors a non-reentrant checkpoint holds for its recompute (its positional and keyword
    inputs, from its frame's recompute closure), and the module whose forward it runs, if one."""
    frame = next((c.cell_contents for c in pack.__closure__ or () if hasattr(c.cell_contents, "recompute_fn")), None)
    recompute = getattr(frame, "recompute_fn", None)
    if recompute is None or recompute.__closure__ is None:
        return [], None
    cells = {name: _cell(c) for name, c in zip(recompute.__code__.co_freevars, recompute.__closure__)}
    owner, held = _function_owner(cells.get("fn"))
    tensors = tensors_in([cells.get("args") or (), cells.get("kwargs") or {}, held])
    return tensors, owner


def _function_owner(fn: Any) -> tuple[nn.Module | None, list[Any]]:
    """The module whose forward a checkpointed function runs (the module, a bound method, or Hugging
    Face's ``functools.partial(forward, module, **kwargs)``), and what a partial holds besides it."""
    if isinstance(fn, nn.Module):
        return fn, []
    owner = getattr(fn, "__self__", None)
    held: list[Any] = []
    if owner is None and hasattr(fn, "func"):
        owner = fn.args[0] if fn.args else getattr(fn.func, "__self__", None)
        held = [*fn.args[1:], *fn.keywords.values()]
    return (owner if isinstance(owner, nn.Module) else None), held


def _reentrant_frame() -> Any:
    """The innermost running ``CheckpointFunction.forward`` frame, if one (a few frames up)."""
    frame = sys._getframe(2)
    for _ in range(_FRAMES):
        if frame is None or frame.f_code is _REENTRANT_CODE:
            return frame
        frame = frame.f_back
    return None


# CheckpointFunction.forward -> run_function -> Module._call_impl -> hooks -> the probe -> the ledger;
# a user's function may wrap a few calls of its own around the module.
_FRAMES = 24
_REENTRANT_CODE = CheckpointFunction.forward.__code__


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # not filled yet
        return None


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def in_backward() -> bool:
    """Whether a backward pass is running (where checkpointed modules recompute their forward)."""
    return torch._C._current_graph_task_id() != -1
