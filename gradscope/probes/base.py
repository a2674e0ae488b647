"""What every probe of a watched step shares: its hooks' lifetime, its part of the step's one host
transfer, and what it gives the step's record.

The watch holds a list of probes and, at each measured step, asks every one for the device
tensors it wants fetched (``collect``), fetches them all with the gradient statistics in one
copy to the host, then hands each probe its share of the fetched numbers (``contribute``),
which it turns into fields of the ``StepRecord``. A probe records only: it never prints,
judges or writes anything onto the user's modules.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradscope.report import StepRecord


@dataclass(frozen=True)
class StepContext:
    """What a probe knows of the step being measured.

    Attributes:
        index: the step's number (counting the steps ``every`` leaves out).
        loss: the step's loss on the device, or None where the watch does not see it.
    """

    index: int
    loss: torch.Tensor | None


@dataclass(frozen=True)
class Watched:
    """What a watch observes, for the probes it builds by name (``probes.OPTIONAL``).

    Attributes:
        model: the user's module (inside DDP).
        gradients: the watch's ``GradientProbe`` (the trainable parameters, their names, arrivals).
        ranks: a distributed run's ``distributed.Ranks``, or None.
        shards: the same under FSDP (each rank holds a shard of every parameter), else None.
        optimizer: the optimizer the watch observes, or None.
        memory: the memory probe's options (``probes.memory.MemoryOptions``), or None for its defaults.
    """

    model: nn.Module
    gradients: Any
    ranks: Any = None
    shards: Any = None
    optimizer: Any = None
    memory: Any = None


class Probe:
    """The interface of a probe, with do-nothing defaults; subclasses override what they use.

    Attributes:
        name: the probe's part of the step's transfer; unique among a watch's probes.
    """

    name = ""

    def __init__(self) -> None:
        self._handles = contextlib.ExitStack()

    def attach(self) -> None:
        """Register the probe's hooks and modes (each through ``keep``), at the watch's entry."""

    def detach(self) -> None:
        """Remove everything ``keep`` holds; the watch calls it at exit, also when the loop raised."""
        self._handles.close()

    def keep(self, handle: Any) -> Any:
        """Hold a ``RemovableHandle`` (or a context entered for the probe) until ``detach``."""
        if hasattr(handle, "remove"):
            self._handles.callback(handle.remove)
            return handle
        return self._handles.enter_context(handle)

    def begin_step(self, measured: bool) -> None:
        """A step is over: forget it. ``measured``: the next step will be measured."""

    def collect(self, step: StepContext) -> list[torch.Tensor]:
        """The device tensors to fetch for this step (no host sync here)."""
        return []

    def contribute(self, values: list[float], record: StepRecord) -> dict[str, Any]:
        """The ``StepRecord`` fields this probe gives, from its fetched ``values`` (the record so far)."""
        return {}

    def step_done(self, record: StepRecord) -> None:
        """The record is complete (called after every measured step)."""

    def pause(self, paused: bool) -> None:
        """Stop (or resume) recording while gradscope replays a step of its own."""

    def forward_window(self, inputs: Any = None) -> contextlib.AbstractContextManager[Any]:
        """A context a driver enters around its forward and loss on ``inputs`` (the batch)."""
        return contextlib.nullcontext()

    def report_fields(self) -> dict[str, Any]:
        """The ``Report`` fields this probe gives (run-level facts, not per step)."""
        return {}


class Fetch:
    """Named tensors to fetch in the step's one transfer, and the fetched values split back by name."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.parts: list[tuple[str, int]] = []

    def add(self, name: str, *tensors: torch.Tensor) -> None:
        self.tensors.extend(tensors)
        self.parts.append((name, sum(t.numel() for t in tensors)))

    def split(self, flat: list[float]) -> dict[str, list[float]]:
        out, at = {}, 0
        for name, size in self.parts:
            out[name], at = flat[at : at + size], at + size
        return out
