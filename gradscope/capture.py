"""What ``gradscope.watch`` keeps of a user's loop to observe it: the model's last forward call
(to replay a step that shows a NaN), the activation mode switched on only during the model's forward,
and the steps a grad scaler skips."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradscope import replay
from gradscope.probes.activations import ActivationProbe
from gradscope.probes.modules import _tensors
from gradscope.report import NonfiniteOrigin

AUTOCAST_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


class ForwardCapture:
    """Keeps the model's last forward call (inputs, random state, autocast) and the gradient that
    reached its outputs, so a step can be replayed inside the model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.precision = "fp32"
        self._call: tuple[tuple[Any, ...], dict[str, Any], replay.RngState, str, torch.dtype | None] | None = None
        self._outputs: list[torch.Tensor] = []
        self._grads: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> ForwardCapture:
        self._handles = [
            self.model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.model.register_forward_hook(self._after),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self.release()

    def release(self) -> None:
        """Drop the kept output gradients (they are only needed until the step is recorded)."""
        self._outputs, self._grads = [], {}

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled() and not replay.REPLAYING:
            device = next(module.parameters()).device.type if any(True for _ in module.parameters()) else "cpu"
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            self.precision = AUTOCAST_NAMES.get(dtype, "fp32") if dtype is not None else "fp32"
            self._call = (args, kwargs, replay.rng_state(), device, dtype)

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled() or replay.REPLAYING:
            return
        self._outputs = [t for t in _tensors(output) if t.requires_grad]
        self._grads = {}
        for i, t in enumerate(self._outputs):
            t.register_hook(self._keep(i))

    def _keep(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self._grads[i] = grad

        return hook

    def locate(self, kind: str, loss_bad: bool) -> NonfiniteOrigin | None:
        """Replay the last forward call; where the ``kind`` (nan/inf) was made.

        Args:
            kind: ``nan`` or ``inf``.
            loss_bad: the step's loss is known to be non-finite.
        """
        if self._call is None:
            return None
        args, kwargs, state, device, dtype = self._call
        grads = [self._grads.get(i) for i in range(len(self._outputs))]
        from_loss = loss_bad or any(g is not None and _has(g, kind) for g in grads)

        def forward() -> torch.Tensor:
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                outputs = [t for t in _tensors(self.model(*args, **kwargs)) if t.requires_grad]
            if from_loss:
                return sum(o.sum() for o in outputs)  # finite exactly when the outputs are
            # A stand-in loss whose gradient at each output is the one the real loss sent there.
            return sum((o * g).sum() for o, g in zip(outputs, grads) if g is not None) or outputs[0].sum() * 0

        origin = replay.locate(self.model, replay.batch_tensors([args, kwargs], None), forward, state, kind)
        if from_loss and (origin is None or origin.phase == "backward"):
            # The model's outputs are finite: the loss, computed after the model, made it.
            count = sum(_count(g, kind) for g in grads if g is not None)
            return NonfiniteOrigin(phase="loss", kind=kind, count=count, source="after the model's forward (the loss)")
        return origin


@contextlib.contextmanager
def during_forward(model: nn.Module, mode: ActivationProbe) -> Any:
    """Keep ``mode`` active only while ``model``'s forward runs (not in the loss, backward or the
    optimizer, whose ops it would only slow down); pushed back off also when the forward raises."""
    depth = [0]

    def enter(*_: Any) -> None:
        depth[0] += 1
        if depth[0] == 1:
            mode.__enter__()

    def leave(*_: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            mode.__exit__(None, None, None)

    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while depth[0] > 0:  # a forward still running (the block exited from inside it)
            leave()


@contextlib.contextmanager
def record_scaler_skips(scaler: torch.amp.GradScaler, scope: Any) -> Any:
    """Record the steps a grad scaler skips (it does not call ``optimizer.step``, so no pre-hook fires)."""
    original = scaler.step

    def step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        before = len(scope.steps)
        result = original(optimizer, *args, **kwargs)
        if len(scope.steps) == before and optimizer is scope.optimizer:
            scope._finish(loss=None, skipped=True)
        return result

    scaler.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        del scaler.step


def _has(t: torch.Tensor, kind: str) -> bool:
    return bool(t.isnan().any()) if kind == "nan" else bool(t.isinf().any())


def _count(t: torch.Tensor, kind: str) -> int:
    return int(t.isnan().sum()) if kind == "nan" else int(t.isinf().sum())
