"""Hooks and modes that record while the model runs; each probe shares ``base.Probe``.

The watch builds its own probes (gradients, histograms, activations, ranks) and, by name, the
optional ones listed here (``gradscope.watch(model, opt, probes=("update_ratio",))``). A new
optional probe is a module of its own plus one line in ``OPTIONAL``.
"""

from __future__ import annotations

from collections.abc import Callable

from gradscope.probes import memory, update_ratio
from gradscope.probes.base import Probe, Watched

OPTIONAL: dict[str, Callable[[Watched], Probe]] = {
    "memory": memory.MemoryProbe,
    "update_ratio": update_ratio.UpdateRatioProbe,
}


def optional(names: tuple[str, ...] | list[str], watched: Watched) -> list[Probe]:
    """The optional probes named, built for ``watched``.

    Raises:
        ValueError: a name that is not in ``OPTIONAL``.
    """
    unknown = [n for n in names if n not in OPTIONAL]
    if unknown:
        allowed = ", ".join(sorted(OPTIONAL)) or "none"
        raise ValueError(f"unknown probe {unknown[0]!r}: the optional probes are {allowed}")
    return [OPTIONAL[name](watched) for name in names]
