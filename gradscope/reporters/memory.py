"""The terminal's memory section: what autograd saved for backward, the largest modules, the
parameters, gradients and optimizer state beside it, and the checkpointing advice, in lines of at
most 80 columns. Reads the report's ``memory`` only."""

from __future__ import annotations

import textwrap

from rich.text import Text

from gradscope.report.memory import MemoryReport, ModuleMemory, format_bytes

WIDTH = 80
TOP_MODULES = 8
TOP_ADVICE = 5


def memory_section(memory: MemoryReport) -> Text:
    """The section as rich text, every line within ``WIDTH`` columns."""
    lines: list[tuple[str, str]] = [(f"memory, step {memory.step}", "bold")]
    lines += [(line, "") for line in _totals(memory)]
    lines += _modules(memory)
    lines += _advice(memory)
    lines += _plan(memory)
    for note in memory.notes:  # wrapped, not cut: a note says what the numbers leave out
        lines += [
            (line, "dim") for line in textwrap.wrap(note, WIDTH, initial_indent="  note: ", subsequent_indent="    ")
        ]
    text = Text()
    for i, (line, style) in enumerate(lines):
        text.append(("\n" if i else "") + _fit(line), style=style)
    return text


def _totals(m: MemoryReport) -> list[str]:
    opt = format_bytes(sum(m.optimizer_bytes.values())) if m.optimizer_bytes else "none yet"
    saved = [f"  saved for backward {format_bytes(m.saved_bytes)}"]
    if len(m.saved_by_dtype) > 1:
        by = _dtypes(m.saved_by_dtype)
        if len(saved[0]) + len(by) + 3 <= WIDTH:
            saved = [f"{saved[0]} ({by})"]
        else:
            saved += textwrap.wrap(by, WIDTH, initial_indent="    by dtype: ", subsequent_indent="      ")
    out = [
        *saved,
        f"  parameters {format_bytes(sum(m.parameter_bytes.values()))}, gradients "
        f"{format_bytes(sum(m.gradient_bytes.values()))}, optimizer state {opt}",
        f"  batch {format_bytes(m.batch_bytes)}; total without the batch {format_bytes(m.total_bytes)}",
    ]
    if m.outside_bytes:
        out.append(f"  of the saved bytes, {format_bytes(m.outside_bytes)} by the loss outside the model")
    if m.cuda is not None:
        c = m.cuda
        error = f", ledger off by {100 * c.ledger_error:+.1f}%" if c.ledger_error is not None else ""
        out.append(
            f"  CUDA: forward allocated {format_bytes(c.allocated_after - c.allocated_before)}"
            f", peak {format_bytes(c.peak)}{error}"
        )
    return out


def _dtypes(by: dict[str, int]) -> str:
    return ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(by.items(), key=lambda kv: -kv[1]))


def top_modules(m: MemoryReport, count: int = TOP_MODULES) -> list[tuple[str, ModuleMemory]]:
    """The modules that saved most (inclusive), the root and pass-through wrappers left out."""
    rows = [
        (name, mod)
        for name, mod in m.modules.items()
        if name and mod.saved_bytes and mod.order >= 0 and not _wrapper(name, mod, m.modules)
    ]
    return sorted(rows, key=lambda r: -r[1].saved_bytes)[:count]


def _wrapper(name: str, mod: ModuleMemory, modules: dict[str, ModuleMemory]) -> bool:
    return any(n.rpartition(".")[0] == name and c.saved_bytes == mod.saved_bytes for n, c in modules.items())


def _modules(m: MemoryReport) -> list[tuple[str, str]]:
    rows = top_modules(m)
    if not rows:
        return []
    out = [("  largest modules (inclusive)", "bold")]
    for name, mod in rows:
        share = 100 * mod.saved_bytes / m.saved_bytes if m.saved_bytes else 0.0
        mark = " ckpt" if mod.checkpointed else ""
        out.append(
            (f"    {_left(name, 36):36} {mod.type[:16]:16} {format_bytes(mod.saved_bytes):>9} {share:5.1f}%{mark}", "")
        )
    return out


def _advice(m: MemoryReport) -> list[tuple[str, str]]:
    if not m.checkpointing:
        return []
    out = [("  checkpointing advice (frees, recompute; best first)", "bold")]
    for a in m.checkpointing[:TOP_ADVICE]:
        cost = f"{a.flops / 1e9:.3g} GFLOP" if a.flops else "no FLOPs"
        per = f"{format_bytes(a.bytes_per_gflop)}/GFLOP" if a.bytes_per_gflop else ""
        out.append((f"    {_left(a.module, 36):36} {format_bytes(a.frees_bytes):>9}  {cost:>12}  {per}", ""))
    if len(m.checkpointing) > TOP_ADVICE:
        out.append((f"    ... {len(m.checkpointing) - TOP_ADVICE} more candidates in the JSON report", "dim"))
    return out


def _plan(m: MemoryReport) -> list[tuple[str, str]]:
    plan = m.plan
    if plan is None:
        return []
    head = (
        f"  budget {format_bytes(plan.budget_bytes)}: params + grads + optimizer + saved "
        f"= {format_bytes(plan.total_bytes)}"
    )
    if not plan.modules and plan.fits:
        return [(head + ", fits", "green")]
    out = [(head, "bold")]
    if not plan.fits:
        out.append((f"  does not fit: {plan.reason}", "bold red"))
        return out
    out.append(("  to fit it, add to the config:", ""))
    out += [("    " + line, "cyan") for line in paste_lines(list(plan.patterns or plan.modules))]
    out.append(
        (f"  predicted: frees {format_bytes(plan.frees_bytes)}, about {100 * plan.slowdown:.0f}% more step compute", "")
    )
    return out


def paste_lines(patterns: list[str], width: int = WIDTH - 4) -> list[str]:
    """``checkpointing: {modules: [...]}`` as YAML flow lines of at most ``width`` columns."""
    lines, line = [], "checkpointing: {modules: ["
    for i, pattern in enumerate(patterns):
        item = pattern + ("]}" if i == len(patterns) - 1 else ",")
        if len(line) + len(item) + 1 > width and not line.endswith("["):
            lines.append(line)
            line = "  "
        line += item if line.endswith(("[", "  ")) else " " + item
    lines.append(line)
    return lines


def _left(name: str, width: int) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def _fit(line: str) -> str:
    return line if len(line) <= WIDTH else line[: WIDTH - 3] + "..."
