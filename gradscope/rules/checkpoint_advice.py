"""Checkpointing advice from the memory ledger: pure functions of its numbers.

Checkpointing a module frees what it saved for backward except what it must keep (its inputs, and
storages modules outside it save too), and costs one more forward of it in the backward pass.
Candidates are ranked by bytes freed per GFLOP of recompute; with a budget, the cheapest set found
whose freed bytes bring parameters + gradients + optimizer state + saved activations within it.
"""

from __future__ import annotations

from dataclasses import replace

from gradscope.report.memory import CheckpointAdvice, CheckpointPlan, MemoryReport, ModuleMemory

BACKWARD_TO_FORWARD = 2.0  # a backward costs about twice the forward's FLOPs


def advise(memory: MemoryReport, budget: int | None = None) -> MemoryReport:
    """``memory`` with its ranked advice and, with a budget, the plan that fits it."""
    advice = rank(memory.modules)
    plan = plan_for(memory, advice, budget) if budget is not None else None
    return replace(memory, checkpointing=tuple(advice), plan=plan)


def rank(modules: dict[str, ModuleMemory]) -> list[CheckpointAdvice]:
    """The candidates that checkpointing would free bytes of, best first (most bytes per FLOP)."""
    done = [name for name, m in modules.items() if m.checkpointed]
    out = []
    for name, m in modules.items():
        if not m.candidate or m.keeps_bytes is None or m.checkpointed or _within_any(name, done):
            continue
        frees = m.saved_bytes - m.keeps_bytes
        if frees <= 0:
            continue
        flops = m.flops or 0
        per = frees / (flops / 1e9) if flops else None
        out.append(CheckpointAdvice(name, frees, flops, m.forward_s, round(per, 1) if per is not None else None))
    # A module without FLOPs (or FLOPs not counted) costs next to nothing to recompute: first.
    return sorted(out, key=lambda a: (bool(a.flops), -(a.bytes_per_gflop or 0.0), -a.frees_bytes))


def plan_for(memory: MemoryReport, advice: list[CheckpointAdvice], budget: int) -> CheckpointPlan:
    """The cheapest set of candidates found (greedy by bytes per FLOP, then pruned) whose
    checkpointing brings the run within ``budget``."""
    total = memory.total_bytes
    base = CheckpointPlan(budget_bytes=budget, total_bytes=total)
    need = total - budget
    if need <= 0:
        return base
    if memory.state_bytes > budget:
        reason = (
            f"parameters, gradients and optimizer state alone take {memory.state_bytes} bytes, more than the "
            f"budget: no checkpointing fits it (shard the optimizer state, lower precision, or raise the budget)"
        )
        return replace(base, fits=False, reason=reason)
    chosen: list[CheckpointAdvice] = []
    for a in advice:
        if sum(c.frees_bytes for c in chosen) >= need:
            break
        overlap = [c for c in chosen if _nested(a.module, c.module)]
        # A module around chosen ones replaces them when it frees more than they do together.
        if all(_within_any(c.module, [a.module]) for c in overlap) and a.frees_bytes > sum(
            c.frees_bytes for c in overlap
        ):
            chosen = [c for c in chosen if c not in overlap] + [a]
    freed = sum(c.frees_bytes for c in chosen)
    if freed < need:
        reason = (
            f"checkpointing every candidate frees {freed} bytes, {need - freed} short of the {need} needed: "
            f"name larger modules in memory.candidates, or raise the budget"
        )
        return replace(
            base, modules=_names(chosen), frees_bytes=freed, fits=False, reason=reason, **_cost(memory, chosen)
        )
    for c in sorted(chosen, key=lambda c: -c.flops):  # drop what the others make unnecessary, dearest first
        if freed - c.frees_bytes >= need:
            chosen.remove(c)
            freed -= c.frees_bytes
    chosen.sort(key=lambda c: memory.modules[c.module].order)
    names = _names(chosen)
    patterns = tuple(compact(names, memory.modules))
    return replace(base, modules=names, patterns=patterns, frees_bytes=freed, **_cost(memory, chosen))


def _cost(memory: MemoryReport, chosen: list[CheckpointAdvice]) -> dict[str, float | int]:
    flops = sum(c.flops for c in chosen)
    step = (1 + BACKWARD_TO_FORWARD) * memory.forward_flops if memory.forward_flops else 0
    return {"recompute_flops": flops, "slowdown": round(flops / step, 4) if step else 0.0}


def _names(chosen: list[CheckpointAdvice]) -> tuple[str, ...]:
    return tuple(c.module for c in chosen)


def _nested(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".") or not a or not b


def _within_any(name: str, parents: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or not p for p in parents)


def compact(modules: tuple[str, ...], known: dict[str, ModuleMemory]) -> list[str]:
    """The modules as ``checkpointing.modules`` patterns: ``parent.*`` where every child of a parent
    that ran is chosen, the names themselves otherwise."""
    chosen = set(modules)
    out: list[str] = []
    for name in modules:
        parent = name.rpartition(".")[0]
        siblings = [n for n in known if n and n.rpartition(".")[0] == parent]
        if parent and len(siblings) > 1 and all(s in chosen for s in siblings):
            pattern = f"{parent}.*"
            if pattern not in out:
                out.append(pattern)
        else:
            out.append(name)
    return out
