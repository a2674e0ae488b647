"""The ``backward()`` calls of a watched loop: how many ran, and the loss each one backpropagated.

``Tensor.backward`` calls ``torch.autograd.backward``; while a watch is open that function is
wrapped (once, however many watches are open) and each call hands its root tensor to every open
watch before the backward runs. Nothing is computed there but a detached copy of a one-element
root, added on the device to the step's loss so far: no host sync. ``Tensor.backward`` is wrapped
too, so that a watch acts in the caller's frame before torch dispatches the call (the loss code's
mode comes off there). The wrappers come off when the last watch closes, also when the loop raised.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from gradscope.locate import replay

Listener = Callable[[Any, Any], None]  # (tensors, grad_tensors) of a backward about to run

_running = False  # a backward is running (one started inside it is part of it)


class _Patch:
    """A torch function wrapped while anyone listens (once, however many watches are open); the
    original comes back with the last listener, also when the loop raised."""

    def __init__(self, owner: Any, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        self.owner, self.name, self.wrap = owner, name, wrap
        self.listeners: list[Callable[..., None]] = []
        self.original: Callable[..., Any] | None = None

    @contextlib.contextmanager
    def listening(self, listener: Callable[..., None]) -> Iterator[None]:
        if not self.listeners:
            self.original = getattr(self.owner, self.name)
            setattr(self.owner, self.name, self.wrap(self.original))
        self.listeners.append(listener)
        try:
            yield
        finally:
            self.listeners.remove(listener)
            if not self.listeners and self.original is not None:
                setattr(self.owner, self.name, self.original)
                self.original = None


def _wrap_autograd(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def backward(tensors: Any, grad_tensors: Any = None, *args: Any, **kwargs: Any) -> Any:
        global _running
        # Not gradscope's own replays, nor a backward run inside one (reentrant checkpointing's regions).
        if not replay.in_replay() and not _running:
            for listener in tuple(_AUTOGRAD.listeners):
                listener(tensors, grad_tensors)
        outer, _running = _running, True
        try:
            return original(tensors, grad_tensors, *args, **kwargs)
        finally:
            _running = outer

    return backward


def _wrap_tensor(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not _running:
            for call in tuple(_TENSOR.listeners):
                call()
        return original(self, *args, **kwargs)

    return backward


_AUTOGRAD = _Patch(torch.autograd, "backward", _wrap_autograd)
_TENSOR = _Patch(torch.Tensor, "backward", _wrap_tensor)


def observed(listener: Listener) -> contextlib.AbstractContextManager[None]:
    """Call ``listener(tensors, grad_tensors)`` at each ``backward()`` inside the block."""
    return _AUTOGRAD.listening(listener)


def called(call: Callable[[], None]) -> contextlib.AbstractContextManager[None]:
    """Call ``call()`` as each ``Tensor.backward()`` is called inside the block, in the caller's frame:
    before torch hands it to any ``TorchFunctionMode``, so outside every torch function."""
    return _TENSOR.listening(call)


class Backwards:
    """Counts a loop's backward calls and sums the losses they backpropagate, step by step.

    The step's loss is the sum of the one-element roots backpropagated since the last step: the
    loss whose gradient the optimizer steps on (micro-batches each divided by the accumulation
    count sum to their mean). A loss a grad scaler multiplied (``scaler.scale(loss).backward()``)
    is taken before the scaling.

    Args:
        scaler: the loop's grad scaler, or None.
    """

    def __init__(self, scaler: torch.amp.GradScaler | None = None) -> None:
        self.scaler = scaler
        self.count = 0  # backward calls so far
        self.since_step = 0  # backward calls since the last step
        self.paused = False
        self.starting: list[Callable[[], None]] = []  # called as each backward starts (the loss code ended)
        self.calling: list[Callable[[], None]] = []  # called as Tensor.backward() is called, outside torch functions
        self._loss: torch.Tensor | None = None
        self._scaled: tuple[torch.Tensor, torch.Tensor] | None = None  # (scaled, loss) of scaler.scale

    def attach(self, stack: contextlib.ExitStack) -> None:
        """Observe every backward until ``stack`` closes."""
        stack.enter_context(observed(self._seen))
        stack.enter_context(called(self._calling))
        if self.scaler is not None:
            stack.enter_context(_scaled_losses(self.scaler, self._note_scaled))

    def take(self) -> torch.Tensor | None:
        """The loss of the step now being recorded (None: no one-element root seen), forgotten after."""
        loss, self._loss, self._scaled = self._loss, None, None
        self.since_step = 0
        return loss

    def _calling(self) -> None:
        if not self.paused:
            for call in self.calling:
                call()

    def _note_scaled(self, scaled: torch.Tensor, loss: torch.Tensor) -> None:
        self._scaled = (scaled, loss)

    def _seen(self, tensors: Any, grad_tensors: Any) -> None:
        if self.paused:
            return
        for call in self.starting:
            call()
        self.count += 1
        self.since_step += 1
        root = tensors if isinstance(tensors, torch.Tensor) else None
        if root is None and isinstance(tensors, (tuple, list)) and len(tensors) == 1:
            root = tensors[0] if isinstance(tensors[0], torch.Tensor) else None
        if root is None or grad_tensors is not None or root.numel() != 1:
            return  # not a loss: a vector backpropagated with its own gradient
        if self._scaled is not None and self._scaled[0] is root:
            root = self._scaled[1]
        loss = root.detach().float().reshape(())
        self._loss = loss if self._loss is None else self._loss + loss


@contextlib.contextmanager
def _scaled_losses(scaler: torch.amp.GradScaler, note: Callable[[torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Note each loss ``scaler.scale`` multiplies, with its scaled copy (the scaler's ``scale`` is
    wrapped inside the block)."""
    original = scaler.scale

    def scale(outputs: Any) -> Any:
        scaled = original(outputs)
        if isinstance(outputs, torch.Tensor) and isinstance(scaled, torch.Tensor):
            note(scaled, outputs)
        return scaled

    scaler.scale = scale  # type: ignore[method-assign]
    try:
        yield
    finally:
        del scaler.scale
