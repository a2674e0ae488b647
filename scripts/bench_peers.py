"""The tools the overhead benchmark measures beside gradscope, each as a mode around a round of steps.

A mode is a context manager factory ``(model, optimizer, folder) -> Hooks``:
entered before a round (outside the timing), left after it. ``Hooks.after_backward``,
when set, runs in each step between ``backward()`` and clipping, where the
peer's documentation puts it (Lightning's ``on_before_optimizer_step``, the
``wandb.log`` call of a training loop). With ``Hooks.first_only`` the round
times the mode's first step alone (and no other). ``Hooks.settle``, when set, runs once
after the last timed step, inside the timing: what a mode hands to a background
thread (TensorBoard's events) is paid for within the round that made it. A mode
whose package (or gradscope feature) is not there is reported by ``missing`` and
skipped.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import gradscope


@dataclass
class Hooks:
    """What a mode adds to the plain step."""

    after_backward: Callable[[torch.Tensor], None] | None = None
    settle: Callable[[], None] | None = None
    first_only: bool = False  # time the mode's first step alone (where a watch does its one-step work)


Mode = Callable[[nn.Module, torch.optim.Optimizer, Path], contextlib.AbstractContextManager[Hooks]]


@contextlib.contextmanager
def plain(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> Iterator[Hooks]:
    yield Hooks()


# Past the steps a watch keeps in full, each step is judged as it is recorded (which steps to keep):
# the steady state of a long run. Keeping only the first step times that state from the second step.
LONG_RUN = {"first": 1}


@contextlib.contextmanager
def stats(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> Iterator[Hooks]:
    with gradscope.watch(model, optimizer, activations=False, retention=LONG_RUN):
        yield Hooks()


@contextlib.contextmanager
def everything(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> Iterator[Hooks]:
    with gradscope.watch(model, optimizer, retention=LONG_RUN):
        yield Hooks()


@contextlib.contextmanager
def tensorboard(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> Iterator[Hooks]:
    """Everything on, plus a TensorBoard run with every gradient's histogram at every step."""
    with gradscope.watch(model, optimizer, logdir=str(folder / "tb"), histograms_every=1, retention=LONG_RUN) as scope:
        writers = [r for r in scope.reporters.reporters if hasattr(r, "flush")]
        yield Hooks(settle=lambda: [w.flush() for w in writers])


@contextlib.contextmanager
def first(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> Iterator[Hooks]:
    """Everything on, timing the watch's first step alone: the step ``ledger`` measures."""
    with gradscope.watch(model, optimizer, retention=LONG_RUN):
        yield Hooks(first_only=True)


@contextlib.contextmanager
def ledger(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> Iterator[Hooks]:
    """``first`` with the memory ledger (the bytes autograd saves for backward, per module, measured
    on the watch's first step): its cost is this mode against ``first``."""
    with gradscope.watch(model, optimizer, retention=LONG_RUN, memory=True):
        yield Hooks(first_only=True)


@contextlib.contextmanager
def anomaly(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> Iterator[Hooks]:
    with torch.autograd.detect_anomaly():
        yield Hooks()


@contextlib.contextmanager
def lightning_grad_norm(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> Iterator[Hooks]:
    """Lightning's ``grad_norm`` as its docs call it in ``on_before_optimizer_step`` (norms only, no logger)."""
    from lightning.pytorch.utilities import grad_norm

    yield Hooks(after_backward=lambda loss: grad_norm(model, norm_type=2))


_WANDB_RUN = None


@contextlib.contextmanager
def wandb_watch(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> Iterator[Hooks]:
    """``wandb.watch(log="all", log_freq=1)`` in offline mode; each step logs its loss, which commits
    the step's gradient and parameter histograms (the run is started once per process)."""
    global _WANDB_RUN
    import wandb

    if _WANDB_RUN is None:
        os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(folder))
        _WANDB_RUN = wandb.init(project="gradscope-bench", dir=str(folder), mode="offline")
    run = _WANDB_RUN
    run.watch(model, log="all", log_freq=1)
    try:
        yield Hooks(after_backward=lambda loss: run.log({"loss": loss.item()}))
    finally:
        run.unwatch(model)


def finish() -> None:
    """End the wandb run, if one was started (its files stay in the benchmark's temporary folder)."""
    global _WANDB_RUN
    if _WANDB_RUN is not None:
        _WANDB_RUN.finish()
        _WANDB_RUN = None


class NanDetector:
    """fairseq's ``NanDetector`` (``fairseq/nan_detector.py``) as that file does it: a forward and a
    backward hook on every module, each asking ``isnan(t).any()`` then ``isinf(t).any()`` of every
    floating output with two or more values (a host sync each), and every gradient's norm read with
    ``.item()`` when it closes. Written again here, with the full backward hook in place of the
    deprecated ``register_backward_hook`` fairseq uses and no attribute set on the modules."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = {m: name for name, m in model.named_modules()}
        self.found: list[str] = []
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> NanDetector:
        for module in self.names:
            self.handles.append(module.register_forward_hook(self._forward))
            self.handles.append(module.register_full_backward_hook(self._backward))
        return self

    def __exit__(self, *exc: object) -> None:
        norms = {n: p.grad.float().norm().item() for n, p in self.model.named_parameters() if p.grad is not None}
        self.norms = norms
        for handle in self.handles:
            handle.remove()

    def _forward(self, module: nn.Module, args: object, output: object) -> None:
        if not self.found:
            self._check(module, output, "forward")

    def _backward(self, module: nn.Module, grad_input: object, grad_output: object) -> None:
        if not self.found:
            self._check(module, grad_output, "backward")

    def _check(self, module: nn.Module, value: object, phase: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.numel() >= 2:
                with torch.no_grad():
                    err = "NaN" if torch.isnan(value).any() else "Inf" if torch.isinf(value).any() else None
                if err is not None:
                    self.found.append(f"{err} in the {phase} output of {self.names[module]}")
        elif isinstance(value, dict):
            for v in value.values():
                self._check(module, v, phase)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self._check(module, v, phase)


@contextlib.contextmanager
def nan_detector(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> Iterator[Hooks]:
    with NanDetector(model):
        yield Hooks()


@contextlib.contextmanager
def hf_debug(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> Iterator[Hooks]:
    """HF's ``DebugUnderflowOverflow``. It keeps no hook handles, so the hooks it adds to each module
    are found by key and removed after the round."""
    from transformers.debug_utils import DebugUnderflowOverflow

    before = {m: set(m._forward_hooks) for m in model.modules()}
    try:
        DebugUnderflowOverflow(model)
        yield Hooks()
    finally:
        for module, keys in before.items():
            for key in set(module._forward_hooks) - keys:
                del module._forward_hooks[key]


# name -> (mode, the package it needs, or None)
MODES: dict[str, tuple[Mode, str | None]] = {
    "plain": (plain, None),
    "stats": (stats, None),
    "all": (everything, None),
    "all+tb": (tensorboard, "tensorboard"),
    "first": (first, None),
    "ledger": (ledger, None),
    "lightning": (lightning_grad_norm, "lightning"),
    "wandb": (wandb_watch, "wandb"),
    "anomaly": (anomaly, None),
    "nan_detector": (nan_detector, None),
    "hf_debug": (hf_debug, "transformers"),
}


def missing(name: str) -> str | None:
    """What ``name``'s mode needs and does not find (a package, or a gradscope feature), else None."""
    if name == "ledger" and "memory" not in inspect.signature(gradscope.watch).parameters:
        return "gradscope's memory ledger (gradscope.watch(memory=True))"
    package = MODES[name][1]
    if package is not None and importlib.util.find_spec(package) is None:
        return f"the package {package!r} (pip install gradscope[bench])"
    return None
