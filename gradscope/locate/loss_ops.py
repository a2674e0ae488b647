"""Where a NaN made by the user's own loss code was made: the ops between the model's forward and
the ``backward()`` that follows it, watched by a light ``TorchFunctionMode``.

The model is replayed to find a NaN it makes; the loss code is not the watch's to replay. So the ops
that run after the root module's forward returns, until the loop calls ``backward()``, are recorded
as they run: each op's name and the user's line that called it, and, on the device, the NaN and Inf
counts of its floating outputs, and of each tensor it takes that no op of the loss made besides the
model's outputs (the batch's targets, a parameter used in the loss: the model's outputs are the model
replay's to judge, and the origin found here is used only when that replay finds them finite).
Nothing else is kept: no tensor outlives its op. The counts join the step's one transfer; the first non-finite entry in call order says who
made it: an op whose inputs were finite (``nonfinite_loss`` with the op and the line), or a tensor
the loss was given (the batch's targets: ``nonfinite_input``; a weight: the parameter).
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from gradscope.locate import replay
from gradscope.locate.origins import describe_site, is_metadata, op_name
from gradscope.probes.base import Probe, StepContext
from gradscope.report import NonfiniteOrigin, StepRecord
from gradscope.utils.frames import user_site
from gradscope.utils.tensors import tensors_in

IN_PLACE = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__"})
MAX_ENTRIES = 512  # counted tensors per step at most


class _Entry(NamedTuple):  # one counted tensor: an op's output, or a tensor the loss code was given
    op: str | None  # the op that made it (None: given to the loss code)
    site: tuple[str, int, str] | None  # the user's line of the op (or of the op that took the given tensor)
    given: str | None  # a given tensor (not the model's output): a parameter's name, or "input"
    taker: str | None  # the op that took the given tensor
    numel: int
    dtype: str


class _LossMode(TorchFunctionMode):
    """Counts the NaN/Inf of what each op of the loss code makes and takes (on the device, no sync)."""

    def __init__(self, ops: LossOps) -> None:
        super().__init__()
        self.ops = ops

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.ops.open and not self.ops.paused and not is_metadata(func):
            self.ops.seen(func, args, kwargs or {}, out)
        return out


class LossOps(Probe):
    """The loss code's ops, watched from the end of ``model``'s forward to the next ``backward()``.

    Args:
        model: the root module (its forward's return opens the watch on the loss code).
        names: the model's parameters by identity, to name one the loss code takes.
    """

    name = "loss_ops"

    def __init__(self, model: nn.Module, names: dict[int, str]) -> None:
        super().__init__()
        self.model, self.names = model, names
        self.paused = False
        self.open = False  # counting: between the model's forward and the next backward()
        self._measured = True  # the next step is measured (``every``)
        self.found: NonfiniteOrigin | None = None  # the last measured step's origin, if its loss code made it
        self._mode: _LossMode | None = None
        self._outputs: set[int] = set()  # ids of the model's outputs of the open region
        self._made: dict[int, weakref.ref[torch.Tensor]] = {}
        self._entries: list[_Entry] = []
        self._counts: list[torch.Tensor] = []  # per entry: (NaN count, Inf count)

    def attach(self) -> None:
        # Modes come off in the order they went on: this one is popped before any other forward pre-hook
        # pushes one, and pushed after the other forward hooks (attached earlier) have popped theirs.
        self.keep(self.model.register_forward_pre_hook(self._model_starts, prepend=True))
        self.keep(self.model.register_forward_hook(self._model_done))

    def detach(self) -> None:
        self._leave()
        super().detach()

    def pause(self, paused: bool) -> None:
        self.paused = paused

    def _model_starts(self, module: nn.Module, args: Any) -> None:
        self._leave()  # the model runs again before a backward: its own ops are not the loss's

    def _model_done(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled() or replay.in_replay() or self.paused or not self._measured:
            return
        if len(self._entries) > MAX_ENTRIES:
            return  # forwards with no backward (an evaluation with gradients on): stop counting
        self._outputs = {id(t) for t in tensors_in(output)}
        if self._mode is None:
            self._mode = _LossMode(self)
            self._mode.__enter__()
        self.open = True

    def close(self) -> None:
        """The loss code ended (a ``backward()`` starts). The mode itself comes off only outside every
        torch function (``leave_if_innermost``, else at the optimizer step): ``backward`` may be running
        inside this very mode's handler."""
        self.open = False
        self._outputs, self._made = set(), {}

    def leave_if_innermost(self) -> None:
        """A ``backward()`` is being called, outside every torch function: the mode comes off now if it is
        the innermost one, so the user's code between backward and the optimizer step (clipping reads
        every ``.grad``) does not go through it."""
        if self._mode is not None and torch.overrides._get_current_function_mode() is self._mode:
            self._leave()

    def _leave(self) -> None:
        self.close()
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)

    def seen(self, func: Any, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        outs = [t for t in tensors_in(out) if t.is_floating_point()]
        in_place = _writes_in_place(func) or kwargs.get("out") is not None
        if in_place and isinstance(args, tuple) and args and isinstance(args[0], torch.Tensor):
            outs += [args[0]] if args[0].is_floating_point() and all(t is not args[0] for t in outs) else []
        if not outs:
            return
        name, site = op_name(func), user_site()
        with torch._C.DisableTorchFunction():  # gradscope's own ops bypass every mode
            taken = list(tensors_in((args, kwargs)))
            for t in taken:
                ref = self._made.get(id(t))
                if t.is_floating_point() and (ref is None or ref() is not t):
                    self._made[id(t)] = weakref.ref(t)  # counted once
                    if id(t) not in self._outputs:  # the model's outputs: its replay judges them, unread here
                        self._count(t, _Entry(None, site, self._given(t), name, t.numel(), _dtype(t)))
            for t in outs:
                if in_place or not _aliases(t, taken):
                    self._count(t, _Entry(name, site, None, None, t.numel(), _dtype(t)))
                self._made[id(t)] = weakref.ref(t)

    def _given(self, t: torch.Tensor) -> str:
        return self.names.get(id(t), "input")

    def _count(self, t: torch.Tensor, entry: _Entry) -> None:
        t = t.detach()
        self._counts.append(torch.stack([t.isnan().sum(), t.isinf().sum()]).float())
        self._entries.append(entry)

    # --- the step ------------------------------------------------------------------------------------

    def collect(self, step: StepContext) -> list[torch.Tensor]:
        self._leave()  # the optimizer step: outside every torch function
        return [torch.cat(self._counts)] if self._counts else []

    def contribute(self, values: list[float], record: StepRecord) -> dict[str, Any]:
        entries, self._entries, self._counts = self._entries, [], []
        self.found = None
        for i, entry in enumerate(entries):
            nans, infs = int(values[2 * i]), int(values[2 * i + 1])
            if nans or infs:
                self.found = _origin(entry, nans, infs)
                break
        return {}

    def begin_step(self, measured: bool) -> None:
        self._leave()
        self._entries, self._counts = [], []  # a step ``every`` leaves out: not fetched
        self._measured = measured


def _origin(entry: _Entry, nans: int, infs: int) -> NonfiniteOrigin | None:
    kind = "nan" if nans else "inf"
    common = {"kind": kind, "count": nans + infs, "numel": entry.numel, "dtype": entry.dtype}
    if entry.op is not None:
        return NonfiniteOrigin(phase="loss", op=entry.op, source=describe_site(entry.site), **common)
    taken = f"the tensor {entry.taker} takes at {describe_site(entry.site) or 'the loss'}"
    if entry.given == "input":
        return NonfiniteOrigin(phase="input", tensors=(f"{taken}, not the model's output",), **common)
    return NonfiniteOrigin(phase="parameter", tensors=(entry.given,), source=describe_site(entry.site), **common)


def _writes_in_place(func: Any) -> bool:
    """``x.clamp_(...)``, ``x[i] = v``, ``x += y``: the op's first argument is its output too."""
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.startswith("_")) or name in IN_PLACE


def _aliases(out: torch.Tensor, taken: list[torch.Tensor]) -> bool:
    """``out`` holds the values of a tensor its op took, unchanged (a view, ``detach``): they are
    that tensor's, counted already or the model's output, so counting them again (a full pass over
    ``logits.view(-1, vocab)``) finds nothing new. A view as another dtype reads new values: counted."""
    try:
        where = out.untyped_storage().data_ptr()
        return any(t.dtype == out.dtype and t.untyped_storage().data_ptr() == where for t in taken)
    except (RuntimeError, NotImplementedError):  # no storage to compare (a tensor subclass): counted
        return False


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")
