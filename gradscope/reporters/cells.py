"""How the terminal tables write a number in a cell."""

from __future__ import annotations

import math


def num(value: float | None) -> str:
    """4 significant digits, scientific notation outside 1e-3..1e4; ``-`` for unknown, NaN/Inf spelled."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Inf" if value > 0 else "-Inf")
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.3e}"
