"""The overhead benchmark's statistics: per-round ratios, their median, a bootstrap interval, and
whether two modes can be told apart. Plain Python (no torch), so they are tested on made-up numbers.

Each round times every mode once, in a random order; a mode's ratio in a round is its time over
the plain step's time in the same round, so what moved the whole round (another process on the
machine) divides out. A mode's figure is the median of its per-round ratios, and its 95%
interval is the percentile bootstrap of that median. Two modes are compared the same way, by
the median of their per-round ratio to each other: they cannot be told apart when its interval
holds 1.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

LEVEL = 0.95
RESAMPLES = 4000


@dataclass(frozen=True)
class Estimate:
    """A median of per-round ratios and its bootstrap interval."""

    median: float
    low: float
    high: float

    @property
    def holds_one(self) -> bool:
        """1 lies in the interval: the two times it compares cannot be told apart."""
        return self.low <= 1.0 <= self.high

    def __str__(self) -> str:
        return f"{self.median:.3f}x [{self.low:.3f}, {self.high:.3f}]"


def per_round_ratios(times: list[float], base: list[float]) -> list[float]:
    """``times[r] / base[r]`` for each round ``r``.

    Raises:
        ValueError: the lists differ in length, or a base time is not positive.
    """
    if len(times) != len(base):
        raise ValueError(f"a ratio needs one base time per round: {len(times)} times, {len(base)} base times")
    if any(b <= 0 for b in base):
        raise ValueError(f"base times must be positive, got {min(base)}")
    return [t / b for t, b in zip(times, base)]


def bootstrap_interval(
    values: list[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of the median of ``values``: the medians of ``resamples``
    samples drawn from ``values`` with replacement, cut at ``(1 - level) / 2`` on each side."""
    if not values:
        raise ValueError("an interval needs at least one value")
    draw = random.Random(seed)
    n = len(values)
    medians = sorted(statistics.median(draw.choices(values, k=n)) for _ in range(resamples))
    tail = (1.0 - level) / 2.0
    return medians[int(tail * (resamples - 1))], medians[round((1.0 - tail) * (resamples - 1))]


def estimate(times: list[float], base: list[float], seed: int = 0) -> Estimate:
    """The median of ``times``' per-round ratios to ``base`` and its bootstrap interval."""
    ratios = per_round_ratios(times, base)
    low, high = bootstrap_interval(ratios, seed=seed)
    return Estimate(statistics.median(ratios), low, high)


def verdict(name_a: str, times_a: list[float], name_b: str, times_b: list[float]) -> str:
    """A line saying whether ``name_a`` is faster, slower, or cannot be told apart from ``name_b``."""
    e = estimate(times_a, times_b)
    if e.holds_one:
        return f"{name_a} vs {name_b}: {e}, cannot be told apart"
    word = "slower" if e.median > 1.0 else "faster"
    return f"{name_a} vs {name_b}: {e}, {name_a} is {word}"
