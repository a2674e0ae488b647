"""Memory findings: a run over its stated budget, and modules whose saved-for-backward bytes grew
from a baseline's."""

from __future__ import annotations

from typing import Any

from gradscope.report import Anomaly, Report
from gradscope.report.memory import format_bytes


def memory_budget(report: Report, check: Any) -> list[Anomaly]:
    """Parameters + gradients + optimizer state + saved activations over ``memory.budget``."""
    memory = report.memory
    plan = memory.plan if memory is not None else None
    if memory is None or plan is None or plan.total_bytes <= plan.budget_bytes:
        return []
    over = plan.total_bytes - plan.budget_bytes
    said = (
        f"parameters {format_bytes(sum(memory.parameter_bytes.values()))}, gradients "
        f"{format_bytes(sum(memory.gradient_bytes.values()))}, optimizer state "
        f"{format_bytes(sum((memory.optimizer_bytes or {}).values()))} and saved activations "
        f"{format_bytes(memory.saved_bytes)} take {format_bytes(plan.total_bytes)}, "
        f"{format_bytes(over)} over the budget of {format_bytes(plan.budget_bytes)}"
    )
    if not plan.fits:
        todo = plan.reason or "no checkpointing of the candidates fits it"
    else:
        todo = (
            f"checkpoint {', '.join(plan.patterns or plan.modules)} "
            f"(`checkpointing: {{modules: [{', '.join(plan.patterns or plan.modules)}]}}`): predicted to free "
            f"{format_bytes(plan.frees_bytes)} for about {100 * plan.slowdown:.0f}% more compute per step"
        )
    return [
        Anomaly(
            kind="memory_budget",
            severity="error",
            message=f"{said}: {todo}",
            step=memory.step,
            evidence={
                "total_bytes": plan.total_bytes,
                "budget_bytes": plan.budget_bytes,
                "state_bytes": memory.state_bytes,
                "saved_bytes": memory.saved_bytes,
                "modules": list(plan.modules),
                "fits": plan.fits,
            },
        )
    ]


def memory_growth(report: Report, baseline: Report, check: Any) -> list[Anomaly]:
    """Modules whose saved bytes grew more than ``check.factor`` times (and by at least
    ``check.min_bytes``) from the baseline's: one finding naming the innermost of them (where the
    growth is), with every grown module and its numbers in the evidence."""
    now, then = report.memory, baseline.memory
    if now is None or then is None:
        return []
    grown: dict[str, tuple[int, int]] = {}
    for name, m in now.modules.items():
        old = then.modules.get(name)
        if old is None:
            continue
        if m.saved_bytes - old.saved_bytes >= check.min_bytes and m.saved_bytes > check.factor * old.saved_bytes:
            grown[name] = (old.saved_bytes, m.saved_bytes)
    inner = {n: v for n, v in grown.items() if not any(o.startswith(n + ".") or not n for o in grown if o != n)}
    if not inner:
        return []
    first = next(iter(inner))
    listing = ", ".join(
        f"{n or '(root)'} {format_bytes(a)} -> {format_bytes(b)}" for n, (a, b) in list(inner.items())[:6]
    )
    more = f" and {len(inner) - 6} more" if len(inner) > 6 else ""
    total = f"{format_bytes(then.saved_bytes)} -> {format_bytes(now.saved_bytes)}"
    return [
        Anomaly(
            kind="memory_growth",
            severity="error",
            module=first,
            step=now.step,
            message=(
                f"activations saved for backward grew more than {check.factor:g}x from the baseline "
                f"({baseline.run.config or 'saved report'}) in {len(inner)} module(s): {listing}{more} "
                f"(whole model {total}). A change to the model, its inputs or its checkpointing did it; if "
                f"it is intended, update the baseline (--update-baseline)."
            ),
            evidence={n: {"baseline": a, "now": b} for n, (a, b) in grown.items()},
        )
    ]
