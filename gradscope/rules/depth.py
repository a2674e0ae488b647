"""Where a weight sits along the data flow, for the flow rules.

Registration order is not depth: LoRA's ``lora_A`` and ``lora_B`` sit beside a
frozen weight, not two layers apart, and a block's query, key, value and MLP
weights are one step of depth. So the flow rules compare *blocks* (the module
path through its first list index: ``model.layers.3``), each summarised by the
median of its weights, and leave out what zero-initialised partners explain.

A zero-initialised partner is a parameter that starts at (near) zero and gets a
gradient of its own, so the first optimizer step moves it: LoRA's ``B``, a
ReZero gate, ``zero_init_residual``'s last BatchNorm gain, adaLN-Zero's
modulation, a layer scale of 1e-6. Until it moves, the weights it gates (those
of its branch: the nearest enclosing module that holds other trainable weights)
get zero or tiny gradients by design. A zero weight whose own gradient is zero
too is no partner: nothing will ever open it, and ``zero_gradient`` reports it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from gradscope.report import ParamInfo, Report
from gradscope.rules.common import clean_steps, median, per_report

# A parameter whose root-mean-square value is below this counts as zero-initialised
# (ConvNeXt's layer scale starts at 1e-6; no trained or randomly initialised weight is that small).
NEAR_ZERO = 1e-5


@dataclass(frozen=True)
class Partner:
    """A zero-initialised parameter and the parameters of its branch whose gradients it holds back."""

    name: str
    scope: str  # the enclosing module of the branch ("" for the whole model)
    gated: tuple[str, ...]


@per_report
def zero_partners(report: Report) -> list[Partner]:
    """The zero-initialised partners of the model, judged on the first clean step."""
    steps = clean_steps(report)
    if not steps:
        return []
    first = steps[0]
    trainable = [p for p in report.parameters if p.trainable]
    partners = []
    for p in trainable:
        if p.name.endswith("bias") or p.module_type in ("Embedding", "EmbeddingBag"):
            continue  # biases start at zero everywhere; embedding rows are sparse by nature
        s = first.parameters.get(p.name)
        if s is None:
            continue
        if s.param_norm is None or not s.grad_norm or not math.isfinite(s.grad_norm):
            continue
        if s.param_norm > NEAR_ZERO * math.sqrt(max(p.numel, 1)):
            continue
        scope = _branch(p, trainable)
        gated = tuple(q.name for q in trainable if q.name != p.name and _inside(q.module, scope))
        partners.append(Partner(p.name, scope, gated))
    return partners


def explained(partners: list[Partner]) -> set[str]:
    """Every parameter whose gradient a partner explains, and the partners themselves (whose
    |grad|/|weight| right after their first step is huge only because |weight| was zero)."""
    names = {p.name for p in partners}
    for p in partners:
        names.update(p.gated)
    return names


def _branch(p: ParamInfo, trainable: list[ParamInfo]) -> str:
    """The nearest module enclosing ``p`` that holds another trainable weight (not a bias)."""
    parts = p.module.split(".") if p.module else []
    for cut in range(len(parts), -1, -1):
        scope = ".".join(parts[:cut])
        if any(q.name != p.name and not q.name.endswith("bias") and _inside(q.module, scope) for q in trainable):
            return scope
    return ""


def _inside(module: str, scope: str) -> bool:
    return not scope or module == scope or module.startswith(scope + ".")


@functools.lru_cache(maxsize=1 << 14)  # the same modules at every step of a run
def block_of(module: str) -> str:
    """The block a module belongs to: its path through the first list index (``h.0`` in
    ``transformer.h.0.attn.c_attn``), or the module itself outside any list."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return module


def by_block(rel: list[tuple[str, float]], modules: dict[str, str]) -> list[tuple[str, float, list[str]]]:
    """``(block, median |grad|/|weight|, its weights)`` in forward order, from ``(weight, ratio)`` pairs."""
    blocks: dict[str, list[tuple[str, float]]] = {}
    for name, r in rel:
        blocks.setdefault(block_of(modules[name]), []).append((name, r))
    return [(block, median([r for _, r in items]), [n for n, _ in items]) for block, items in blocks.items()]
