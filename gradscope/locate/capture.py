"""What ``gradscope.watch`` keeps of a user's loop to observe it: the model's last forward call
(to replay a step that shows a NaN), the precision its forward ran in, and the steps a grad
scaler skips."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from gradscope.locate import replay
from gradscope.report import NonfiniteOrigin
from gradscope.utils.tensors import tensors_in

AUTOCAST_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPE_NAMES = {**AUTOCAST_NAMES, torch.float32: "fp32", torch.float64: "fp64"}


class PrecisionSeen:
    """The precision the model's first training forward really ran in.

    Autocast is read inside the forward, at the calls of the modules that hold parameters:
    accelerate switches it on inside the model's own ``forward`` and Lightning around
    ``training_step`` (which may call submodules, not the model), so the state outside the
    model's call says nothing. Without autocast, the trainable parameters' dtype tells (a model
    cast to bf16 runs in bf16). The hooks come off after the first step (``settle``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.autocast: torch.dtype | None = None
        self._handles: list[Any] = []
        self._settled: str | None = None  # the name once the first step has run

    def __enter__(self) -> PrecisionSeen:
        owners = [m for m in self.model.modules() if next(m.parameters(recurse=False), None) is not None]
        self._handles = [m.register_forward_pre_hook(self._look) for m in owners]
        return self

    def __exit__(self, *exc: object) -> None:
        self.settle()

    def settle(self) -> None:
        """Stop looking (the first step has run): its hooks come off, and the name is kept."""
        if self._settled is not None:
            return
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._settled = self._seen()

    def _look(self, module: nn.Module, args: Any) -> None:
        if self.autocast is not None or not torch.is_grad_enabled() or replay.in_replay():
            return
        device = next(module.parameters(recurse=False)).device.type
        if torch.is_autocast_enabled(device):
            self.autocast = torch.get_autocast_dtype(device)

    @property
    def name(self) -> str:
        """``bf16``/``fp16`` under autocast, else the trainable parameters' dtype (``fp32``, ``bf16``...),
        as the first step ran (read each time until then)."""
        return self._settled if self._settled is not None else self._seen()

    def _seen(self) -> str:
        if self.autocast is not None:
            return AUTOCAST_NAMES.get(self.autocast, str(self.autocast))
        dtypes = {p.dtype for p in self.model.parameters() if p.requires_grad}
        if len(dtypes) == 1:
            dtype = dtypes.pop()
            return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
        return "fp32" if not dtypes or torch.float32 in dtypes else "mixed"


class ForwardCapture:
    """Keeps the model's last forward call (inputs, random state, autocast), so a step can be
    replayed inside the model. Nothing tensor-sized is kept beyond the call's own inputs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
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
        if torch.is_grad_enabled() and not replay.in_replay():
            param = next(module.parameters(), None)
            device = param.device.type if param is not None else "cpu"
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
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
                outputs = [t for t in tensors_in(eager(*args, **kwargs)) if t.requires_grad]
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
    updates: Callable[[], int],
    skipped: Callable[[], Any],
) -> Iterator[None]:
    """Record the steps a grad scaler skips (it does not call ``optimizer.step``, so no pre-hook fires).

    Args:
        scaler: the user's grad scaler; its ``step`` is wrapped inside the block.
        optimizer: the watched optimizer (other optimizers' steps are left alone).
        updates: how many optimizer steps ran so far.
        skipped: called when the scaler skipped the optimizer's step.
    """
    original = scaler.step

    def step(stepped: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        before = updates()
        result = original(stepped, *args, **kwargs)
        if updates() == before and stepped is optimizer:
            skipped()
        return result

    scaler.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        del scaler.step
