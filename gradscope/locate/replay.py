"""Replaying one step on the same weights, batch and random state, to look closer.

Used only on steps that need it: to find where a NaN/Inf was made, to
compare a low-precision step's gradients with an fp32 step's, and to name the
forward line behind an error PyTorch raised in backward. A replay leaves
``.grad`` as it was and restores the model's buffers (BatchNorm statistics)
and the random state afterwards.

A replay runs the model eagerly: ``torch.compile``d code runs its original
Python (``force_eager``), so the ops and nodes can be seen one by one; and a
region under reentrant checkpointing (``use_reentrant=True``, as Hugging
Face's ``gradient_checkpointing_enable`` may set) runs plainly where the
search needs its autograd nodes, which reentrant checkpointing only makes
inside backward and which ``torch.autograd.grad`` cannot run through.
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from gradscope.locate.forward_origin import NonfiniteFlow
from gradscope.locate.inplace import InplaceWrites, RunningNode, culprit
from gradscope.locate.origins import (
    LOSS_OWNER,
    backward_origin,
    graph_nodes,
    module_name,
    nonfinite_tensors,
    owner_of,
    rows_with,
)
from gradscope.probes.gradients import is_sharded, to_local
from gradscope.probes.modules import ModuleTracker
from gradscope.report import NonfiniteOrigin
from gradscope.utils.frames import pick_user_frame
from gradscope.utils.tensors import tensors_in
from gradscope.utils.wrappers import is_compiled, unwrap

_REPLAYING: ContextVar[bool] = ContextVar("gradscope_replaying", default=False)
Forward = Callable[[], torch.Tensor]  # runs model and loss on the step's batch, returns the loss
RngState = tuple[torch.Tensor, list[torch.Tensor]]


def rng_state() -> RngState:
    """The CPU and CUDA random states (no host sync)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda


def in_replay() -> bool:
    """A replay runs now: hooks that keep the user's own calls skip its calls."""
    return _REPLAYING.get()


@contextlib.contextmanager
def replaying(model: nn.Module, state: RngState, plain: bool = True) -> Iterator[None]:
    """Run the block from the step's random state, eagerly; restore buffers and random state afterwards.

    Args:
        model: the model replayed.
        state: the step's random state.
        plain: reentrant checkpointing runs its regions directly (see ``plain_checkpoints``).
    """
    buffers = [b.detach().clone() for b in model.buffers()]
    now = rng_state()
    _set_rng(state)
    token = _REPLAYING.set(True)
    try:
        with _eager(), plain_checkpoints() if plain else contextlib.nullcontext():
            yield
    finally:
        _REPLAYING.reset(token)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
        _set_rng(now)


def eager_module(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``d model wraps (it shares the parameters); any other as it is."""
    return unwrap(model, compiled=True) if is_compiled(model) else model


def _eager() -> contextlib.AbstractContextManager[Any]:
    """``torch.compile``d code runs its original Python (nothing is compiled unless dynamo was imported)."""
    if "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


@contextlib.contextmanager
def plain_checkpoints() -> Iterator[None]:
    """Inside the block, a reentrant checkpoint runs its function directly, as if not checkpointed.

    The values are the same (the function runs once, from the same random state); what changes is
    that its autograd nodes exist after the forward, so hooks can be put on them and
    ``torch.autograd.grad`` can run through them. As reentrant checkpointing does, a region none of
    whose tensor inputs requires grad makes no graph.
    """
    cls = torch.utils.checkpoint.CheckpointFunction

    def apply(function: Callable[..., Any], preserve_rng_state: bool, *args: Any) -> Any:
        differentiable = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            return function(*args)

    cls.apply = staticmethod(apply)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        del cls.apply  # back to the classmethod every autograd.Function inherits


def _set_rng(state: RngState) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


def locate(
    model: nn.Module,
    batch_tensors: dict[str, torch.Tensor],
    forward: Forward,
    state: RngState,
    kind: str,
    lockstep: bool = False,
) -> NonfiniteOrigin | None:
    """Where the step's first NaN (``kind="nan"``) or Inf was made.

    Checks the batch and the weights, then replays the forward op by op,
    following non-finite values forward. If the replayed loss is not finite,
    the op that made the NaN/Inf it holds is the origin (an Inf made and
    thrown away before is not). If it is finite (only gradients are bad), a
    NaN made in the forward did not reach the loss (``where`` discarded it),
    so the backward is replayed node by node to find the gradient that turned.

    With ``lockstep`` (FSDP: the forward gathers parameters from every rank),
    the forward is replayed even when the batch or weights already explain it.

    The batch's rows that hold the value at the origin op are its ``samples`` (when the op's
    output, or the batch tensor, has the batch's first dimension).
    """
    model = eager_module(model)  # replayed eagerly, and named as the user names it
    batch = batch_size(batch_tensors)
    bad_inputs = nonfinite_tensors(batch_tensors)
    params = dict(model.named_parameters())
    bad_params = nonfinite_tensors({n: to_local(p).detach() for n, p in params.items()})
    already = (
        _already(bad_inputs, "input", kind, _input_rows(batch_tensors, bad_inputs, kind, batch)) if bad_inputs else None
    )
    if already is None and bad_params:
        already = _already(bad_params, "parameter", kind)
    if already is not None and not lockstep:
        return already
    trainable = [p for p in params.values() if p.requires_grad]
    with _traced(model, state, forward, batch) as (loss, tracker, flow):
        if already is not None:
            return already
        found = flow.origin_of(loss)
        if found is not None:
            return found
        if not loss.requires_grad or any(is_sharded(p) for p in trainable):
            return None  # FSDP's gradients reach its gathered parameters, which a replay cannot follow
        return backward_origin(loss, trainable, tracker, flow.ops, kind, flow.loss_nodes)


def overflow_origin(model: nn.Module, forward: Forward, state: RngState, scale: float) -> NonfiniteOrigin | None:
    """Where the step's scaled gradients first overflowed: the grad scaler multiplies the loss by
    ``scale`` before backward, and in fp16 a gradient above 65504 becomes Inf.

    The step is replayed (its forward and loss, under its autocast) and backward runs from the loss
    times ``scale``; the first autograd node whose incoming gradients are finite and whose outgoing
    ones hold an Inf is the origin (phase ``backward``), named by op, module and source line.
    """
    model = eager_module(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if any(is_sharded(p) for p in trainable):
        return None  # FSDP's gradients reach its gathered parameters, which a replay cannot follow
    with _traced(model, state, forward) as (loss, tracker, flow):
        if not loss.requires_grad or not torch.isfinite(loss).item():
            return None
        return backward_origin(loss * scale, trainable, tracker, flow.ops, "inf", flow.loss_nodes)


@contextlib.contextmanager
def _traced(
    model: nn.Module, state: RngState, forward: Forward, batch: int | None = None
) -> Iterator[tuple[torch.Tensor, ModuleTracker, NonfiniteFlow]]:
    """The step's forward replayed op by op: its loss, the modules that made each node, and the ops
    (a backward replayed inside the block can name them)."""
    with replaying(model, state), ModuleTracker(model, claim_nodes=True) as tracker:
        flow = NonfiniteFlow(tracker, batch)
        with flow:
            loss = forward()
        yield loss, tracker, flow


def _already(bad: dict[str, tuple[int, int]], phase: str, kind: str, samples: tuple[int, ...] = ()) -> NonfiniteOrigin:
    names = tuple(bad)
    count = sum(n if kind == "nan" else i for n, i in bad.values())
    return NonfiniteOrigin(phase=phase, kind=kind, tensors=names, count=count, samples=samples)


def _input_rows(
    named: dict[str, torch.Tensor], bad: dict[str, tuple[int, int]], kind: str, batch: int | None
) -> tuple[int, ...]:
    rows = {i for name in bad for i in rows_with(named[name], kind, batch)}
    return tuple(sorted(rows))


def batch_size(named: dict[str, torch.Tensor]) -> int | None:
    """Rows of the batch: the first dimension of its first tensor that has one."""
    return next((t.shape[0] for t in named.values() if t.dim() > 0), None)


# A zero in one precision against an fp32 value this far below its own gradient's largest entry is the
# rounding of a sum that cancels (a key projection's bias: softmax ignores a shift shared by every key,
# so its gradient is exactly zero in exact arithmetic), not range: fp32 keeps a residue of ~1e-7 of
# the summed terms, bf16/fp16 one of ~1e-3, and either may land on 0.
CANCELLATION = 1e-3


def underflow(
    model: nn.Module, forward: Forward, state: RngState, dtype: torch.dtype, scale: float = 1.0
) -> dict[str, float]:
    """Per parameter, the fraction of gradient entries that the low precision flushed to zero.

    Call right after a low-precision backward (``.grad`` unscaled), with a ``forward`` that runs in
    fp32 (autocast off) on the same weights and batch. An entry is flushed when it is zero now and
    the fp32 step's value is below the smallest normal of the type the gradient passed through
    (``dtype``, or the parameter's own where that is narrower), divided by the loss scale. The
    smallest normal, not subnormal: an entry is a sum of smaller terms, which fp16 loses below its
    smallest subnormal (6e-8), so an entry in its subnormal range (6e-8 to 6.1e-5) that comes out 0
    lost them to range. bf16 has fp32's range: its flushes are below 1.2e-38. An entry more than
    ``1 / CANCELLATION`` times below its gradient's largest entry (in either precision) is not
    counted: that far down, a zero against a residue is the rounding of a sum that cancels.

    Args:
        model: the model, right after its low-precision backward.
        forward: model and loss on the step's batch, in fp32.
        state: the step's random state.
        dtype: the autocast dtype of the step (``torch.float16`` or ``torch.bfloat16``).
        scale: the loss scale the backward ran at (1 without a grad scaler).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    low = [(p.grad == 0, p.grad.detach().abs().amax().float()) for _, p in named]
    # Checkpointing stays on: an fp32 replay is the one that needs its memory saving most.
    with replaying(model, state, plain=False):
        loss = forward()
        full = gradients(loss, model, [p for _, p in named])
    lost = []
    for (_, param), (zero, low_max), grad in zip(named, low, full):
        if grad is None:
            lost.append(torch.zeros((), device=zero.device))
            continue
        flushed = zero & flushed_by_range(grad, _tiny(dtype, param.dtype) / scale, low_max)
        lost.append(flushed.sum() / max(zero.numel(), 1))
    if not lost:
        return {}
    values = torch.stack([v.float() for v in lost]).tolist()
    return {name: value for (name, _), value in zip(named, values)}


def flushed_by_range(full: torch.Tensor, tiny: float, low_max: torch.Tensor) -> torch.Tensor:
    """Entries of an fp32 gradient that a type whose smallest normal is ``tiny`` cannot hold, and that
    stand within ``CANCELLATION`` of the gradient's largest entry (``low_max``: the low precision's)."""
    size = full.detach().abs().float()
    own = torch.maximum(size.amax(), low_max)  # the gradient's own scale, in either precision
    return (size > 0) & (size < tiny) & (size >= CANCELLATION * own)


def _tiny(dtype: torch.dtype, param: torch.dtype) -> float:
    """The smallest normal of the narrower of the autocast dtype and the parameter's own."""
    return max(torch.finfo(dtype).tiny, torch.finfo(param).tiny)


def gradients(loss: torch.Tensor, model: nn.Module, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The gradients of ``loss`` for ``params``; every ``.grad`` is left as it was.

    ``torch.autograd.grad`` where it can run; through reentrant checkpointing, which refuses it,
    a ``.backward()`` into ``.grad``s set aside beforehand and put back afterwards.
    """
    if not any(_is_reentrant(node) for node in graph_nodes(loss.grad_fn)):
        return list(torch.autograd.grad(loss, params, allow_unused=True))
    every = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in every]
    for p in every:
        p.grad = None
    try:
        loss.backward()
        return [p.grad for p in params]
    finally:
        for p, grad in zip(every, saved):
            p.grad = grad


def _is_reentrant(node: Any) -> bool:
    return type(node).__name__ == "CheckpointFunctionBackward"


def backward_error_site(model: nn.Module, forward: Forward, state: RngState) -> dict[str, str | None]:
    """Replay forward and backward under anomaly mode: where backward raised.

    Returns:
        ``BackwardFailure`` fields: the failing autograd ``node``, the user's forward line that
        created it (``source``, which anomaly mode records), the ``module`` whose call created it
        (it saved the tensor), and for a tensor changed in place, the op that changed it
        (``modified_by``), its module (``modified_in``) and line (``modified_at``).
    """
    model = eager_module(model)
    message = ""
    with (
        warnings.catch_warnings(record=True) as caught,
        replaying(model, state),
        ModuleTracker(model, claim_nodes=True) as tracker,
    ):
        warnings.simplefilter("always")
        writes = InplaceWrites(tracker)
        running = RunningNode([])
        with torch.autograd.detect_anomaly(check_nan=False):
            try:
                with writes:
                    loss = forward()
                running = RunningNode(graph_nodes(loss.grad_fn))
                with running:
                    torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
            except RuntimeError as exc:
                message = str(exc)
        owner = owner_of(running.last, tracker, writes.loss_nodes) if running.last is not None else None
        module = module_name(owner, tracker) if owner is not None and owner is not LOSS_OWNER else None
        site: dict[str, str | None] = {"node": None, "source": None, "module": module}
    for warning in caught:
        text = str(warning.message)
        match = re.search(r"Error detected in (\w+)", text)
        if match:
            site.update(node=match.group(1), source=_innermost_user_line(text))
            break
    write = culprit(writes.writes, message, running.last)
    if write is not None:
        site.update(modified_by=write.op, modified_in=write.module, modified_at=write.source)
    return site


def _innermost_user_line(trace: str) -> str | None:
    return pick_user_frame(re.findall(r'File "([^"]+)", line (\d+), in (\S+)', trace))


def batch_tensors(inputs: Any, labels: Any) -> dict[str, torch.Tensor]:
    """The batch's tensors by a readable name (``inputs``, ``inputs[1]``, ``labels``); integer ones
    (token ids) too, for the batch's size, though only floating ones can hold a NaN."""
    named: dict[str, torch.Tensor] = {}
    for prefix, value in (("inputs", inputs), ("labels", labels)):
        tensors = tensors_in(value)
        for i, t in enumerate(tensors):
            named[prefix if len(tensors) == 1 else f"{prefix}[{i}]"] = t
    return named
