"""The memory ledger of one measured step, behind the ``Probe`` interface: what autograd saves for
backward, per module, beside the parameters, gradients, optimizer state and batch.

The ledger is open for one forward: the one a driver wraps in ``forward_window()`` (``gradscope
inspect`` wraps the model and its loss), or else the first measured call of the model itself
(``gradscope.watch``: a loss computed outside the model is then not seen). While open, a pack hook
records each saved storage, module hooks keep the stack of running modules, and a
``FlopCounterMode`` counts the forward FLOPs of the checkpointing candidates. Everything comes off
when the window closes, also on error; the module hooks come off once the step is recorded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gradscope.probes import memory_facts as facts
from gradscope.probes.base import Probe, Watched
from gradscope.probes.memory_ledger import Ledger, in_backward
from gradscope.report import StepRecord
from gradscope.report.memory import CudaMemory, MemoryReport
from gradscope.rules.checkpoint_advice import advise
from gradscope.utils.tensors import tensors_in
from gradscope.utils.wrappers import is_compiled


@dataclass(frozen=True)
class MemoryOptions:
    """What the memory probe looks at besides the ledger.

    Attributes:
        candidates: patterns of modules to consider for checkpointing, besides the repeated blocks.
        flops: count the candidates' forward FLOPs (a dispatch mode over the measured forward).
        budget: bytes that parameters + gradients + optimizer state + saved activations must fit.
    """

    candidates: tuple[str, ...] = ()
    flops: bool = True
    budget: int | None = None


class MemoryProbe(Probe):
    """The ``memory`` probe: ``Report.memory`` from the first measured step.

    Args:
        watched: the model, and the optimizer whose state is counted.
    """

    name = "memory"

    def __init__(self, watched: Watched) -> None:
        super().__init__()
        self.model: nn.Module = watched.model
        self.optimizer = watched.optimizer
        options = watched.memory or MemoryOptions()
        self.options = options
        named = facts.named_candidates(self.model, options.candidates)
        self.candidates = set(facts.repeated_blocks(self.model)) | set(named)
        self.ledger: Ledger | None = None
        self.step: int | None = None  # the step the ledger measured
        self.done = False
        self._armed, self._paused = True, False
        self._window: contextlib.ExitStack | None = None
        self._owner: nn.Module | None = None  # the module whose call opened the window
        self._hooks = contextlib.ExitStack()
        self._cuda: dict[str, int] = {}
        self._state: dict[str, Any] = {}
        self.batch_bytes: int | None = None  # the driver's batch (else the model's inputs)
        self.notes: list[str] = []

    def attach(self) -> None:
        if is_compiled(self.model):
            self.notes.append("torch.compile'd model: the memory ledger is off (its hooks would break the graph)")
            self.done = True
            return
        self.keep(self._hooks)
        self.keep(contextlib.closing(self))  # a window left open by an error closes with the watch
        for module in self.model.modules():
            pre = module.register_forward_pre_hook(self._enter, with_kwargs=True)
            post = module.register_forward_hook(self._leave, with_kwargs=True, always_call=True)
            self._hooks.callback(pre.remove)
            self._hooks.callback(post.remove)

    def begin_step(self, measured: bool) -> None:
        self._armed = measured and not self.done

    def pause(self, paused: bool) -> None:
        self._paused = paused

    @contextlib.contextmanager
    def forward_window(self, inputs: Any = None) -> Iterator[None]:
        """Open the ledger around the block (a driver's forward and loss on ``inputs``), if this step
        is measured."""
        opened = self._open(reset_peak=True)
        if opened and inputs is not None:
            self.batch_bytes = _bytes(inputs)
        try:
            yield
        finally:
            if opened:
                self.close()

    # --- the window ----------------------------------------------------------------------------

    def _open(self, reset_peak: bool = False) -> bool:
        ledger = self.ledger if self.ledger is not None and not self.done else None
        if not self._armed or self._paused or self._window is not None or self.done or in_backward():
            return False
        if ledger is not None and ledger.backward_started:
            return False  # the step's backward began: a later forward (the next micro-batch) is not this one
        ledger = ledger or Ledger(self.model, self.candidates)
        window = contextlib.ExitStack()
        try:
            if self.options.flops and self.candidates:
                ledger.counter = window.enter_context(FlopCounterMode(display=False))
            window.enter_context(torch.autograd.graph.saved_tensors_hooks(ledger.pack, ledger.unpack))
            if not self._cuda:
                self._cuda = self._cuda_start(reset_peak)
        except BaseException:
            window.close()
            raise
        self.ledger, self._window = ledger, window
        ledger.open()
        return True

    def close(self) -> None:
        """Close the window if it is open (the hooks of the forward come off)."""
        window, self._window = self._window, None
        if window is None:
            return
        try:
            if self.ledger is not None:
                self.ledger.close()
                if self._cuda:
                    self._cuda["after"] = torch.cuda.memory_allocated(self._cuda["device"])
        finally:
            window.close()

    def _cuda_start(self, reset_peak: bool) -> dict[str, int]:
        param = next(self.model.parameters(), None)
        if param is None or param.device.type != "cuda":
            return {}
        device = param.device.index if param.device.index is not None else torch.cuda.current_device()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)
        return {"device": device, "before": torch.cuda.memory_allocated(device), "reset": int(reset_peak)}

    # --- module hooks --------------------------------------------------------------------------

    def _enter(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self._window is None and self._open():  # the outermost call of a module of the model
            self._owner = module
            self._state["by_modules"] = True
            if self.batch_bytes is None:
                self._state["inputs"] = self._state.get("inputs", 0) + _bytes(args, kwargs)
        if self.ledger is not None:
            self.ledger.enter(module, args, kwargs)

    def _leave(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self.ledger is not None:
            self.ledger.leave(module, args, kwargs, output)
        if self._owner is module:
            self._owner = None
            self.close()

    # --- the step ------------------------------------------------------------------------------

    def contribute(self, values: list[float], record: StepRecord) -> dict[str, Any]:
        if self.done or self.ledger is None:
            return {}
        self.close()
        self.done, self.step = True, record.step
        self._state["gradients"] = facts.gradient_bytes(self.model)
        if self._cuda:
            self._cuda["peak"] = torch.cuda.max_memory_allocated(self._cuda["device"])
        self._hooks.close()  # measured once: the forward runs without them from now on
        return {}

    def report_fields(self) -> dict[str, Any]:
        return {"memory": self.report()} if self.step is not None else {}

    def report(self) -> MemoryReport | None:
        """The ledger as plain numbers (the optimizer's state read now, after its step)."""
        ledger = self.ledger
        if ledger is None or self.step is None:
            return None
        saved = sum(e.nbytes for e in ledger.saved.values())
        outside = sum(e.nbytes for e in ledger.saved.values() if "<outside>" in e.savers)
        notes = list(self.notes)
        if self._state.get("by_modules"):
            notes.append(
                "measured over the model's calls before the backward: a loss computed outside them is not in it"
            )
        memory = MemoryReport(
            step=self.step,
            saved_bytes=saved,
            modules=facts.module_table(ledger),
            saved_by_dtype=facts.saved_by_dtype(ledger),
            saved_parameter_bytes=sum(ledger.saved_state.values()),
            outside_bytes=outside,
            parameter_bytes=facts.state_bytes(self.model),
            gradient_bytes=self._state.get("gradients", {}),
            optimizer_bytes=facts.optimizer_bytes(self.optimizer),
            batch_bytes=self.batch_bytes if self.batch_bytes is not None else self._state.get("inputs", 0),
            forward_flops=ledger.total_flops,
            cuda=self._cuda_view(saved),
            notes=tuple(notes),
        )
        return advise(memory, self.options.budget)

    def _cuda_view(self, saved: int) -> CudaMemory | None:
        c = self._cuda
        if not c or "after" not in c:
            return None
        grown = c["after"] - c["before"]
        error = (saved - grown) / grown if grown > 0 else None
        return CudaMemory(c["before"], c["after"], c.get("peak", 0), round(error, 4) if error is not None else None)


def _bytes(*values: Any) -> int:
    return sum(facts.by_dtype(tensors_in(list(values))).values())
