"""How far each weight moved: ``|delta w| / |w|`` per parameter, the update-to-weight ratio that
Karpathy's "Recipe for Training Neural Networks" looks at (around 1e-3 is healthy; far above, the
learning rate is too high for that layer; far below, it barely learns).

At each measured step the probe compares every trainable weight with its copy from the previous
measured step (kept on the device: one copy of the trainable parameters), on the device and in
place: the norms join the step's one host transfer. With ``every=1`` a step's ratio is the update
the optimizer made at the step before it; the first measured step has none. The values go to
``StepRecord.probes["update_ratio"]``, by parameter name.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradscope.probes.base import Probe, StepContext, Watched
from gradscope.probes.gradients import to_local
from gradscope.probes.reductions import l2_norms
from gradscope.report import StepRecord


class UpdateRatioProbe(Probe):
    """Each trainable parameter's change since the previous measured step, relative to its norm then.

    Args:
        watched: what the watch observes (the gradient probe's parameters; FSDP's shards).
    """

    name = "update_ratio"

    def __init__(self, watched: Watched) -> None:
        super().__init__()
        self.params, self.names, self.shards = watched.gradients.params, watched.gradients.names, watched.shards
        self._previous: list[torch.Tensor] | None = None  # the weights at the last measured step
        self._measured = False

    def collect(self, step: StepContext) -> list[torch.Tensor]:
        with torch.no_grad():
            now = [to_local(p).detach() for p in self.params]
            if self._previous is None:
                self._previous, self._measured = [t.clone() for t in now], False
                return []
            before = l2_norms(self._previous)
            torch._foreach_sub_(self._previous, now)  # in place: the weights' change, negated, no new copy
            moved = l2_norms(self._previous)
            torch._foreach_copy_(self._previous, now)
        table = torch.stack([moved.double(), before.double()])  # (2, parameters)
        if self.shards is not None:  # FSDP: each rank holds a shard; the norms are of the whole weights
            table = self.shards.reduce_sum(table.square()).sqrt()
        self._measured = True
        return [table]

    def contribute(self, values: list[float], record: StepRecord) -> dict[str, Any]:
        if not self._measured:
            return {}
        n = len(self.names)
        ratios = {name: _ratio(moved, before) for name, moved, before in zip(self.names, values[:n], values[n:])}
        return {"probes": {**record.probes, self.name: ratios}}


def _ratio(moved: float, before: float) -> float:
    if before:
        return moved / before
    return 0.0 if moved == 0 else math.inf  # a weight that was all zeros (LoRA's B at the start)
