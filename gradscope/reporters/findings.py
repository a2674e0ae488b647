"""Findings as a person reads them: those of one kind and one cause grouped into one.

A dead-ReLU check over a 30-block model gives one finding per ReLU, near-identical but for the
layer and the numbers. The terminal, GitHub annotations and JUnit show them as one group that
lists the layers (``blocks.{0-27}.act``), the steps and the range of the number that varies; the
JSON keeps every finding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gradscope.report import Anomaly

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?")
_PIECES = re.compile(r"(\d+)")
SHOWN_NAMES = 6  # a list of unrelated names longer than this ends with "and N more"


@dataclass(frozen=True)
class Group:
    """Findings of one kind, severity and cause, in report order (the first is the example)."""

    anomalies: tuple[Anomaly, ...]

    @property
    def first(self) -> Anomaly:
        return self.anomalies[0]

    @property
    def kind(self) -> str:
        return self.first.kind

    @property
    def severity(self) -> str:
        return self.first.severity

    @property
    def places(self) -> list[str]:
        """The layers (modules or parameters) the findings name, each once, in order."""
        seen: dict[str, None] = {}
        for a in self.anomalies:
            place = a.module or a.parameter
            if place:
                seen.setdefault(place, None)
        return list(seen)

    def where(self) -> str:
        """``blocks.{0-27}.act, steps 0-3``: the places, steps and ranks, for a one-line header."""
        parts = [compress_names(self.places)] if self.places else []
        steps = self.steps()
        if steps:
            parts.append(f"step{'s' if ',' in steps or '-' in steps else ''} {steps}")
        ranks = sorted({a.rank for a in self.anomalies if a.rank is not None})
        if ranks:
            parts.append(f"rank{'s' if len(ranks) > 1 else ''} {_ranges(ranks)}")
        return ", ".join(p for p in parts if p)

    def steps(self) -> str:
        """The steps where the findings start, as ranges (``0-3,7``); empty when none has a step."""
        return _ranges(sorted({a.step for a in self.anomalies if a.step is not None}))

    def spread(self) -> str:
        """The range of each evidence number that differs between the findings (``fraction 55%-100%``)."""
        if len(self.anomalies) < 2:
            return ""
        out = []
        for key, value in self.first.evidence.items():
            values = [a.evidence.get(key) for a in self.anomalies]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                continue
            low, high = min(values), max(values)  # type: ignore[type-var]
            if low != high:
                out.append(f"{key} {_value(key, low)}-{_value(key, high)}")
        return ", ".join(out)


def group(anomalies: tuple[Anomaly, ...] | list[Anomaly]) -> list[Group]:
    """Findings grouped by kind, severity and cause, in the order of each group's first finding.

    The cause is the message with the finding's own names, source line and numbers taken out: two
    dead ReLUs in different blocks share it, an unused module and a detached output do not.
    """
    groups: dict[tuple[str, str, str], list[Anomaly]] = {}
    for a in anomalies:
        groups.setdefault((a.kind, a.severity, cause(a)), []).append(a)
    return [Group(tuple(found)) for found in groups.values()]


def cause(a: Anomaly) -> str:
    """The message as a template: names of the finding's place and source, and numbers, replaced."""
    text = a.message
    evidence = a.evidence if isinstance(a.evidence, dict) else {}
    names = [a.module, a.parameter, evidence.get("source"), evidence.get("site")]
    for name in sorted((n for n in names if isinstance(n, str) and n), key=len, reverse=True):
        text = text.replace(name, "<name>")
    return _NUMBER.sub("<n>", text)


def compress_names(names: list[str]) -> str:
    """Names that differ in one number only, as one pattern (``blocks.{0-3,5}.act``); else a list,
    cut after a few with how many more."""
    if len(names) == 1:
        return names[0]
    split = [_PIECES.split(n) for n in names]
    shape = len(split[0])
    if all(len(s) == shape for s in split):
        differs = [i for i in range(shape) if len({s[i] for s in split}) > 1]
        if len(differs) == 1 and differs[0] % 2 == 1:  # odd pieces are the digit runs
            i = differs[0]
            numbers = sorted({int(s[i]) for s in split})
            if len(numbers) == len(names):
                return "".join(split[0][:i]) + "{" + _ranges(numbers) + "}" + "".join(split[0][i + 1 :])
    if len(names) <= SHOWN_NAMES:
        return ", ".join(names)
    return ", ".join(names[:SHOWN_NAMES]) + f" and {len(names) - SHOWN_NAMES} more"


def _ranges(numbers: list[int]) -> str:
    """``0-3,5,7-9`` for sorted distinct integers."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _value(key: str, value: float) -> str:
    if "fraction" in key and 0 <= value <= 1:
        return f"{value:.0%}"
    return f"{value:.3g}"
