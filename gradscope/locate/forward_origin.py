"""Where the NaN/Inf that reaches a forward's result was made: non-finite values followed op by op.

The origin is not the first op that makes a non-finite value, but the first
one whose non-finite output flows on to the result. Models make Infs that
they throw away: T5's relative position buckets take ``log(0) = -inf`` and
cast it to an integer index, attention code selects ``-inf`` away with
``torch.where``, fp16 guards clamp an overflow back into range. An op's
non-finite output therefore carries the origin of the non-finite input it
came from; where no input had one, the op itself is the origin. An output
that is finite again (clamped, selected away, cast to an integer) carries
nothing, so what was made before it is forgotten.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from gradscope.locate.origins import (
    allocated,
    called_by_distributed,
    count_nonfinite,
    describe_site,
    explicit_inf,
    is_metadata,
    module_name,
    op_name,
    rows_with,
)
from gradscope.probes.modules import ModuleTracker
from gradscope.report import NonfiniteOrigin
from gradscope.utils.frames import user_site
from gradscope.utils.tensors import tensors_in


@dataclass(frozen=True)
class _State:
    """What a tensor held when last seen (at its ``_version``), and where its NaN/Inf came from."""

    ref: weakref.ref[torch.Tensor]
    version: int
    nan: bool
    inf: bool
    origin: NonfiniteOrigin | None = None
    explicit: bool = False  # an Inf written on purpose (masked_fill(mask, -inf)), not an overflow


class NonfiniteFlow(TorchFunctionMode):
    """Follows NaN/Inf values through a forward; ``origin_of(result)`` says where they were made.

    An Inf written on purpose (an op given an infinite scalar: ``masked_fill(mask, -inf)``) is
    marked as such: a NaN made from it (a softmax over a fully masked row) starts at the op that
    made the NaN, while a NaN made from an overflowed Inf (``inf - inf``, ``inf * 0``) starts at
    the overflow.

    It also maps the autograd node of every op's output to (op name, user source line) in
    ``ops``, for naming the op behind a node in the backward, and keeps the nodes of ops that
    ran outside every module (the loss) in ``loss_nodes``.

    Args:
        tracker: the running module, to name where an op ran.
        batch: rows of the step's batch, to name the samples that hold the value.
    """

    def __init__(self, tracker: ModuleTracker, batch: int | None = None) -> None:
        super().__init__()
        self.tracker, self.batch = tracker, batch
        self.ops: dict[Any, tuple[str, str | None]] = {}
        self.loss_nodes: set[Any] = set()  # nodes of the ops that ran outside every module
        self._seen: dict[int, _State] = {}  # id(tensor) -> its state (the weakref tells a reused id)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if is_metadata(func) or called_by_distributed():
            return func(*args, **kwargs)
        inputs = [t for t in tensors_in([args, kwargs]) if _floating(t)]
        before = [self._state(t) for t in inputs]  # before the op: an in-place op changes its input
        out = func(*args, **kwargs)
        self._record_nodes(func, out)
        outputs = [t for t in tensors_in(out) if _floating(t)]
        changed = [t for t, s in zip(inputs, before) if version_of(t) != s.version and all(t is not o for o in outputs)]
        for t in outputs + changed:
            self._follow(func, t, inputs, before, explicit_inf(args, kwargs))
        return out

    def origin_of(self, t: torch.Tensor) -> NonfiniteOrigin | None:
        """Where the NaN/Inf ``t`` holds was made (None: it is finite, or it came from outside the forward)."""
        state = self._seen.get(id(t))
        return state.origin if state is not None and state.ref() is t else None

    def _state(self, t: torch.Tensor) -> _State:
        state = self._seen.get(id(t))
        if state is not None and state.ref() is t and state.version == version_of(t):
            return state
        return self._remember(t)

    def _remember(self, t: torch.Tensor, origin: NonfiniteOrigin | None = None, explicit: bool = False) -> _State:
        nan, inf = _holds(t)
        state = _State(weakref.ref(t), version_of(t), nan, inf, origin if nan or inf else None, explicit)
        self._seen[id(t)] = state
        return state

    def _follow(
        self, func: Any, out: torch.Tensor, inputs: list[torch.Tensor], before: list[_State], explicit: bool
    ) -> None:
        nan, inf = _holds(out)
        if not (nan or inf):
            self._remember(out)
            return
        nan_in = next((s for s in before if s.nan), None)
        inf_in = next((s for s in before if s.inf), None)
        kind = "nan" if nan else "inf"
        if nan and nan_in is not None:
            source = nan_in
        elif nan and inf_in is not None and inf_in.origin is not None and not inf_in.explicit:
            source = inf_in  # inf - inf, inf * 0: the NaN starts at the overflow
        elif not nan and inf_in is not None:
            source = inf_in
        else:
            source = None  # made here
        if source is not None and source.origin is not None:
            self._remember(out, source.origin, source.explicit)
            return
        origin = self._origin(func, inputs, out, kind)
        self._remember(out, origin, explicit=explicit and not nan)

    def _record_nodes(self, func: Any, out: Any) -> None:
        outside = self.tracker.current is None  # the loss, after the model's forward
        for t in tensors_in(out):
            if t.grad_fn is not None and t.grad_fn not in self.ops:
                self.ops[t.grad_fn] = (op_name(func), describe_site(user_site()))
                if outside:
                    self.loss_nodes.add(t.grad_fn)

    def _origin(self, func: Any, inputs: list[torch.Tensor], produced: torch.Tensor, kind: str) -> NonfiniteOrigin:
        where = self.tracker.current
        site = user_site()
        finite = [t.detach()[torch.isfinite(t.detach())] for t in inputs]
        values = torch.cat([t.float().flatten() for t in finite]) if finite else torch.zeros(0)
        return NonfiniteOrigin(
            phase="forward" if where else "loss",
            kind=kind,
            op=op_name(func),
            module=module_name(where, self.tracker),
            source=describe_site(site),
            dtype=str(produced.dtype).removeprefix("torch."),
            count=int(count_nonfinite(produced, kind)),
            numel=produced.numel(),
            input_min=float(values.min()) if values.numel() else None,
            input_max=float(values.max()) if values.numel() else None,
            samples=rows_with(produced, kind, self.batch),
        )


def _floating(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() > 0 and allocated(t)


def _holds(t: torch.Tensor) -> tuple[bool, bool]:
    """(holds a NaN, holds an Inf): one host sync, two more only for a tensor that is not finite."""
    if not _floating(t):
        return False, False
    t = t.detach()  # isfinite and isinf decompose into ops that would save tensors for backward
    if bool(torch.isfinite(t).all()):
        return False, False
    return bool(t.isnan().any()), bool(t.isinf().any())


def version_of(t: torch.Tensor) -> int:
    try:
        return t._version
    except (RuntimeError, AttributeError):  # inference tensors and some subclasses keep none
        return -1
