"""The training loop around the gradients: what the optimizer holds and does, and the model's mode.

At each measured optimizer step, before the update, it notes from host state alone (no sync):
which parameters got a gradient but are in no param group, whether every group's learning rate
is 0, whether no parameter of the optimizer has a gradient, and whether the model (the root
module) is in eval mode. Whether the update moved the weights is measured on a sample: a strided
slice of at most ``SAMPLE`` entries of at most ``SAMPLED`` weight matrices is copied on the device
before the update, and the largest |delta w| over the sample is taken on the device after it; that
one number joins the next step's transfer (the last update's is left unread: no sync of its own).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from gradscope.probes.base import Probe, StepContext
from gradscope.probes.gradients import GradientProbe, is_sharded
from gradscope.report import LoopFacts, StepRecord

SAMPLED = 4  # weight matrices sampled for the update
SAMPLE = 32  # entries of each
EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)  # rows outside the batch do not move under SGD


class LoopProbe(Probe):
    """Observes the loop around the gradients of ``model`` stepped by ``optimizer`` (may be None).

    Args:
        model: the root module the user trains (inside DDP).
        gradients: the watch's gradient probe (parameters, names, arrivals).
        optimizer: the torch optimizer, or None.
    """

    name = "loop"

    def __init__(self, model: nn.Module, gradients: GradientProbe, optimizer: torch.optim.Optimizer | None) -> None:
        super().__init__()
        self.model, self.gradients, self.optimizer = model, gradients, optimizer
        self.facts = LoopFacts(optimizer=optimizer is not None, backwards=0, updates=0, checked=0)
        self._held: tuple[tuple[int, int], ...] = ()  # the groups' identity, to recompute ``_ids`` on change
        self._ids: set[int] = set()
        self._outside: dict[str, None] = {}
        self._sample: list[tuple[torch.Tensor, int, torch.Tensor]] | None = None  # (param, stride, before)
        self._pending: torch.Tensor | None = None  # the max |delta w| of the last update, on the device
        self._sampling = False
        self._affected: tuple[str, ...] | None = None
        self._zeroed: set[str] = set()  # the last step's cleared gradients
        self._arrived: list[int] | None = None  # the recorded step's gradients the optimizer holds

    # --- before the update (inside the step's measurement) ---------------------------------------

    def collect(self, step: StepContext) -> list[torch.Tensor]:
        pending, self._pending = self._pending, None
        if self.optimizer is not None:
            self._take_sample()
        f = self.facts
        checked: dict[str, Any] = {"checked": f.checked + 1}
        if not self.model.training and self.affected():
            checked.update(eval_steps=f.eval_steps + 1, eval_first=_first(f.eval_first, step.index))
            checked["eval_affected"] = self.affected()
        if self.optimizer is not None:
            checked.update(self._optimizer_state(step.index))
        self.facts = replace(f, **checked)
        return [pending.reshape(1)] if pending is not None else []

    def _optimizer_state(self, index: int) -> dict[str, Any]:
        f, opt = self.facts, self.optimizer
        out: dict[str, Any] = {}
        lrs = [g.get("lr") for g in opt.param_groups]
        if lrs and all(isinstance(lr, (int, float)) and lr == 0 for lr in lrs):  # a tensor lr is not read: a sync
            out.update(lr_zero_steps=f.lr_zero_steps + 1, lr_zero_first=_first(f.lr_zero_first, index))
        ids = self._held_ids()
        arrived = self.gradients.arrived()
        params, names = self.gradients.params, self.gradients.names
        outside = [names[i] for i in arrived if id(params[i]) not in ids]
        if outside:
            self._outside.update(dict.fromkeys(outside))
            out["outside"] = tuple(self._outside)
        out["inside"] = max(f.inside, len(arrived) - len(outside))
        self._arrived = [i for i in arrived if id(params[i]) in ids]  # to tell a clearing after this record
        held = [p for p in params if id(p) in ids]
        if held and not arrived and all(p.grad is None for p in held):
            out["no_gradient_steps"] = f.no_gradient_steps + 1
        return out

    def _held_ids(self) -> set[int]:
        groups = self.optimizer.param_groups
        key = tuple((id(g["params"]), len(g["params"])) for g in groups)
        if key != self._held:
            self._held, self._ids = key, {id(p) for g in groups for p in g["params"]}
        return self._ids

    def _take_sample(self) -> None:
        if self._sample is None:
            self._sample = self._choose()
            self.facts = replace(self.facts, sampled=tuple(self._names_of(self._sample)))
        with torch.no_grad():
            self._sample = [(p, stride, _slice(p, stride).clone()) for p, stride, _ in self._sample]
        self._sampling = bool(self._sample)

    def _choose(self) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        """Up to ``SAMPLED`` weight matrices the optimizer holds, spread over the model's depth."""
        ids = self._held_ids()
        owners = {n: m for n, m in self.model.named_modules()}
        names = self.gradients.names
        weights = [
            (p, name)
            for p, name in zip(self.gradients.params, names)
            if id(p) in ids
            and p.dim() >= 2
            and not is_sharded(p)
            and not isinstance(owners.get(name.rpartition(".")[0]), EMBEDDINGS)
        ]
        if len(weights) > SAMPLED:
            weights = [weights[round(i * (len(weights) - 1) / (SAMPLED - 1))] for i in range(SAMPLED)]
        return [(p, max(1, p.numel() // SAMPLE), p.new_empty(0)) for p, _ in weights]

    def _names_of(self, sample: list[tuple[torch.Tensor, int, torch.Tensor]]) -> list[str]:
        by_id = {id(p): n for p, n in zip(self.gradients.params, self.gradients.names)}
        return [by_id[id(p)] for p, _, _ in sample]

    def before_update(self) -> None:
        """The optimizer is about to update, after the step was recorded (``scope.step()``, the Hugging
        Face callback): gradients set to None since the record (a later ``on_pre_optimizer_step``
        callback's ``model.zero_grad()``) are cleared between backward and step all the same. Host
        state alone; a gradient zeroed in place since then cannot be told from a clipped one without a sync."""
        arrived, self._arrived = self._arrived, None
        if not arrived:
            return
        params, names = self.gradients.params, self.gradients.names
        gone = [names[i] for i in arrived if params[i].grad is None]
        if not gone or set(gone) <= self._zeroed:  # cleared before the record: counted with it
            return
        if self._zeroed:  # the record counted this step already: only the names join
            self.facts = replace(self.facts, cleared=tuple(dict.fromkeys([*self.facts.cleared, *gone])))
        else:
            self.facts = _cleared(self.facts, gone, every=len(gone) == len(arrived), to="None")
        self._zeroed |= set(gone)

    # --- after the update ------------------------------------------------------------------------

    def updated(self) -> None:
        """The optimizer stepped: how far the sampled weights moved (on the device, no sync)."""
        self._arrived = None
        self.facts = replace(self.facts, updates=self.facts.updates + 1)
        if not self._sampling or not self._sample:
            return
        self._sampling = False
        with torch.no_grad():
            moved = [(_slice(p, stride).float() - before.float()).abs().amax() for p, stride, before in self._sample]
            self._pending = torch.stack(moved).amax()

    def contribute(self, values: list[float], record: StepRecord) -> dict[str, Any]:
        f = self.facts
        if values:  # the previous update's movement
            unmoved = f.unmoved_steps + (values[0] == 0.0)
            f = replace(f, moved_checked=f.moved_checked + 1, unmoved_steps=unmoved)
        if record.cleared:
            to = (
                "zeros"
                if any(n in record.parameters and record.parameters[n].received for n in record.cleared)
                else "None"
            )
            gone = set(record.cleared)
            kept = [n for n, s in record.parameters.items() if s.received and n not in gone and n not in self._outside]
            f = _cleared(f, record.cleared, every=not kept, to=to)
        self.facts = f
        # Not stale: added onto a gradient the optimizer does not hold and so never zeroes (not_in_optimizer
        # says so), or onto the zeros a zero_grad(set_to_none=False) left before the last step (no_update).
        innocent, self._zeroed = self._zeroed | self._outside.keys(), set(record.cleared)
        if record.stale and innocent:
            return {"stale": tuple(n for n in record.stale if n not in innocent)}
        return {}

    def settle(self) -> None:
        """The watch closes: the last update's movement is left unread (fetching it would be a host
        sync of its own); every earlier update's came with the step after it."""
        self._pending = None

    def affected(self) -> tuple[str, ...]:
        """The model's modules whose forward differs in training, as ``name (type)``: Dropout (p > 0),
        BatchNorm and InstanceNorm that track running statistics (found once)."""
        if self._affected is None:
            named = self.model.named_modules()
            self._affected = tuple(f"{n or '(model)'} ({_kind(m)})" for n, m in named if _train_dependent(m))
        return self._affected

    def with_backwards(self, backwards: int) -> LoopFacts:
        return replace(self.facts, backwards=backwards)


def _cleared(facts: LoopFacts, names: tuple[str, ...] | list[str], every: bool, to: str) -> LoopFacts:
    """``facts`` with one more step whose gradients of ``names`` were cleared between backward and step
    (``every``: all the optimizer would have used)."""
    return replace(
        facts,
        cleared_steps=facts.cleared_steps + 1,
        cleared_all_steps=facts.cleared_all_steps + every,
        cleared_to=facts.cleared_to or to,
        cleared=tuple(dict.fromkeys([*facts.cleared, *names])),
    )


def _train_dependent(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return module.track_running_stats
    return False


def _kind(module: nn.Module) -> str:
    p = getattr(module, "p", None)
    return f"{type(module).__name__} p={p:g}" if isinstance(p, float) else type(module).__name__


def _slice(param: torch.Tensor, stride: int) -> torch.Tensor:
    return param.detach().reshape(-1)[::stride][:SAMPLE]


def _first(first: int | None, index: int) -> int:
    return index if first is None else first
