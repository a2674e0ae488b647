"""How ``gradscope --help`` reads: plain click help (no ``<bool>`` after flags), usage lines that
name arguments as ``CONFIG`` rather than ``{config}``, and the exit codes at the end."""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand

# "\b" keeps click from re-flowing the lines of the paragraph it starts.
EXIT_CODES = (
    "\b\nExit codes:\n"
    "  0    no finding at or above --fail-on\n"
    "  1    findings at or above --fail-on\n"
    "  2    bad usage or config, or the model, data or loss raised\n"
    "  3    internal error (a bug in gradscope: please report it)\n"
    "  130  interrupted (the steps measured so far are still written)"
)


class Command(TyperCommand):
    """A typer command whose usage line reads ``gradscope inspect [OPTIONS] CONFIG``."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or (param.name or "").upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces
