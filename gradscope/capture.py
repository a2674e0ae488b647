"""What ``gradscope.watch`` keeps of a user's loop to observe it: the model's last forward call
(to replay a step that shows a NaN) and the steps a grad scaler skips."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from gradscope import replay
from gradscope.probes.modules import _tensors
from gradscope.report import NonfiniteOrigin

AUTOCAST_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


class ForwardCapture:
    """Keeps the model's last forward call (inputs, random state, autocast), so a step can be
    replayed inside the model. Nothing tensor-sized is kept beyond the call's own inputs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.precision = "fp32"
        self._call: tuple[tuple[Any, ...], dict[str, Any], replay.RngState, str, torch.dtype | None] | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> ForwardCapture:
        self._handles = [self.model.register_forward_pre_hook(self._before, with_kwargs=True)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._call = None

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled() and not replay.REPLAYING:
            param = next(module.parameters(), None)
            device = param.device.type if param is not None else "cpu"
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            self.precision = AUTOCAST_NAMES.get(dtype, "fp32") if dtype is not None else "fp32"
            self._call = (args, kwargs, replay.rng_state(), device, dtype)

    def locate(self, kind: str, loss_bad: bool, lockstep: bool = False) -> NonfiniteOrigin | None:
        """Replay the last forward call; where the ``kind`` (nan/inf) was made.

        The model's outputs are replayed, then its backward from a gradient of ones at each output
        (the gradient the user's loss sent is not kept, to keep no output-sized tensor alive): a
        NaN that a backward formula makes (0 * inf, sqrt at 0) shows from any incoming gradient.
        If neither the forward nor the backward inside the model makes it, it came from the loss.

        Args:
            kind: ``nan`` or ``inf``.
            loss_bad: the step's loss is known to be non-finite.
            lockstep: FSDP: every rank replays together (see ``replay.locate``).
        """
        if self._call is None:
            return None
        args, kwargs, state, device, dtype = self._call
        eager = replay.eager_module(self.model)  # a compiled model is replayed through its original

        def forward() -> torch.Tensor:
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                outputs = [t for t in _tensors(eager(*args, **kwargs)) if t.requires_grad]
            return sum(o.float().sum() for o in outputs)  # finite exactly when the outputs are

        origin = replay.locate(self.model, replay.batch_tensors([args, kwargs], None), forward, state, kind, lockstep)
        if origin is None or (loss_bad and origin.phase == "backward"):
            # The model's outputs are finite and its backward makes nothing: the loss made it.
            return NonfiniteOrigin(phase="loss", kind=kind, source="after the model's forward (the loss)")
        return origin


@contextlib.contextmanager
def record_scaler_skips(
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    recorded: Callable[[], int],
    record_skipped: Callable[[], Any],
) -> Iterator[None]:
    """Record the steps a grad scaler skips (it does not call ``optimizer.step``, so no pre-hook fires).

    Args:
        scaler: the user's grad scaler; its ``step`` is wrapped inside the block.
        optimizer: the watched optimizer (other optimizers' steps are left alone).
        recorded: how many steps are recorded so far.
        record_skipped: records the step as skipped.
    """
    original = scaler.step

    def step(stepped: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        before = recorded()
        result = original(stepped, *args, **kwargs)
        if recorded() == before and stepped is optimizer:
            record_skipped()
        return result

    scaler.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        del scaler.step
