"""Dead and saturated units of a watched model, step by step, behind the ``Probe`` interface.

The first step runs under the activation mode with global module hooks (``ModuleTracker``),
which sees every activation however it is called, and learns which modules ran. After it,
when every activation was an activation module, forward hooks on those modules take over
(``ActivationProbe.module_sites``): the mode costs a Python call per op of the forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gradscope.probes.activations import ActivationProbe
from gradscope.probes.base import Probe, StepContext
from gradscope.probes.modules import ModuleTracker
from gradscope.report import StepRecord


class ActivationCounts(Probe):
    """``StepRecord.activations``, and the modules the first step called.

    Args:
        model: the user's module (inside DDP), whose forward the mode watches.
        ranks: a distributed run's ``distributed.Ranks``: units are combined over every rank's slice.

    Attributes:
        tracker: the running module, for other hooks that name modules (custom Function checks).
        called: the modules the first measured step called (None before it).
    """

    name = "activations"

    def __init__(self, model: nn.Module, ranks: Any = None) -> None:
        super().__init__()
        self.model, self.ranks = model, ranks
        self.tracker = ModuleTracker(model)
        self.mode = ActivationProbe(self.tracker)
        self.called: tuple[str, ...] | None = None
        self._mode_stack = contextlib.ExitStack()  # the mode and global module hooks of the first step

    def attach(self) -> None:
        self.keep(self._mode_stack)
        self._mode_stack.enter_context(self.tracker)
        self._mode_stack.enter_context(during_forward(self.model, self.mode))

    def begin_step(self, measured: bool) -> None:
        self.mode.reset()
        self.tracker.reset()
        self.mode.paused = not measured

    def collect(self, step: StepContext) -> list[torch.Tensor]:
        values = self.mode.values(self.ranks)
        return [torch.stack(values)] if values else []  # one tensor, not one per site

    def contribute(self, values: list[float], record: StepRecord) -> dict[str, Any]:
        world = self.ranks.world if self.ranks is not None else 1
        return {"activations": self.mode.results(values, world)}

    def step_done(self, record: StepRecord) -> None:
        if self.called is None:
            self.called = tuple(self.tracker.calls)
            self._hooks_instead_of_mode()

    def pause(self, paused: bool) -> None:
        self.mode.paused = paused

    def _hooks_instead_of_mode(self) -> None:
        """When every activation was an activation module, hooks on those modules replace the mode
        and the global module hooks (a Python call per op and per module)."""
        sites = self.mode.module_sites(self.model)
        if sites is None:
            return  # F.relu and the like: only the mode sees them
        self._mode_stack.close()
        for handle in self.mode.hook(sites):
            self._mode_stack.callback(handle.remove)


@contextlib.contextmanager
def during_forward(model: nn.Module, mode: ActivationProbe) -> Iterator[None]:
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
