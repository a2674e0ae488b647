"""The row layout of a step's per-parameter readings, as the gradient probe hands them to the host."""

from __future__ import annotations

from dataclasses import dataclass

# Columns of the per-parameter readings, in order (EXTRA_NORM only when asked for).
GRAD_NORM, GRAD_MAX_ABS, GRAD_NONZERO, PARAM_NORM, EXTRA_NORM = range(5)


@dataclass(frozen=True)
class Readings:
    """Per-parameter statistics of one step, on the host.

    ``rows[i]`` belongs to ``params[index[i]]``; parameters that got no
    gradient have no row. ``nonfinite`` maps the index of each parameter
    whose gradient holds NaN or Inf to its (NaN count, Inf count); its row's
    max |g| is then over the finite entries.
    """

    index: list[int]
    rows: list[list[float]]
    scalars: list[float]
    nonfinite: dict[int, tuple[int, int]]
