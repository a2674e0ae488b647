"""When a watched optimizer's step is recorded: at its step pre-hook, before the update, or, for
``optimizer.step(closure)``, once the closure (forward, backward, the user's clipping) has returned.

Lightning and LBFGS run the forward and backward inside ``step``; accelerate and Lightning wrap the
optimizer (``wrappers.unwrap_optimizer`` finds the torch one inside before these hooks go on it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from gradscope.locate.locating import Replay

Record = Callable[[torch.Tensor | None, Replay | None], None]


class StepHooks:
    """Records each optimizer step once through ``record(loss, replay)``; ``updated`` follows each update,
    ``recorded_before`` precedes an update whose step was recorded before it (by ``Watch.step()``).

    Attributes:
        recorded: this step is recorded already (by ``Watch.step()`` or the closure); the pre-hook skips it.
    """

    def __init__(self, record: Record, updated: Callable[[], None], recorded_before: Callable[[], None]) -> None:
        self.record, self.updated, self.recorded_before = record, updated, recorded_before
        self.recorded = False
        self._upcoming: tuple[torch.Tensor | None, Replay | None] = (None, None)

    def attach(self, optimizer: torch.optim.Optimizer, stack: contextlib.ExitStack) -> None:
        """Put the step pre- and post-hooks on ``optimizer``; ``stack`` removes them."""
        stack.callback(optimizer.register_step_pre_hook(self._before_step).remove)
        stack.callback(optimizer.register_step_post_hook(self._after_step).remove)

    def upcoming(self, loss: torch.Tensor | None, replay: Replay | None) -> None:
        """The loss (and a replay) of the step recorded next, from a driver that does not call ``step`` itself."""
        self._upcoming = (loss, replay)

    def _before_step(
        self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self.recorded:
            self.recorded_before()  # recorded by step(): what changed since is seen before the update
            return None
        # ``args`` holds the optimizer itself first, then step's own arguments.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is not None:
            # The step is recorded once the closure has returned (its clipping done), before the update.
            wrapped = self._after_closure(closure)
            if "closure" in kwargs:
                return args, {**kwargs, "closure": wrapped}
            return (args[0], wrapped, *args[2:]), kwargs
        self._record_now(None)
        return None

    def _after_closure(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            result = closure()
            if not self.recorded:  # LBFGS calls the closure again in its line search: the first is the step
                self.recorded = True
                self._record_now(result if isinstance(result, torch.Tensor) else None)
            return result

        return run

    def _record_now(self, loss: torch.Tensor | None) -> None:
        given, replay = self._upcoming
        self._upcoming = (None, None)
        self.record(given if given is not None else loss, replay)

    def _after_step(self, *_: Any) -> None:
        self.updated()
