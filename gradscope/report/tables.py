"""Compact per-step statistics: a step's parameter and module statistics as read-only mappings.

A ``StepRecord`` maps every trainable parameter's name to its ``ParamStats``
and every module's to its ``ModuleStats``. Made one object per parameter and
statistic, a step of a model with a thousand tensors costs a few thousand
Python objects (time at every step, memory for the whole run). ``ParamTable``
keeps a step's readings as one ``array`` of doubles and makes a ``ParamStats``
only when one is looked up; ``ModuleTable`` aggregates the modules the first
time it is read; ``HistogramTable`` keeps a step's gradient histograms as the rows fetched and
makes a ``Histogram`` when one is looked up (a writer can read the rows as they are). All are
``Mapping``s, equal to the dicts they stand for.
"""

from __future__ import annotations

import math
from array import array
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence

from gradscope.report import Histogram, ModuleStats, ParamInfo, ParamStats
from gradscope.report.rows import GRAD_MAX_ABS, GRAD_NONZERO, GRAD_NORM, PARAM_NORM

NO_GRADIENT = ParamStats(None, None, None, 0, 0, None, None)
_COLUMNS = (GRAD_NORM, GRAD_MAX_ABS, GRAD_NONZERO, PARAM_NORM)  # of the probe's rows, kept in this order
_WIDTH = len(_COLUMNS)


class Layout:
    """What every step of a run shares: the trainable parameters' names, sizes and owning modules."""

    def __init__(self, infos: list[ParamInfo]) -> None:
        self.names = tuple(info.name for info in infos)
        self.numel = tuple(info.numel for info in infos)
        self.position = {name: i for i, name in enumerate(self.names)}
        owned: dict[str, list[int]] = defaultdict(list)
        for i, info in enumerate(infos):
            owned[info.module].append(i)
        self.modules = dict(owned)


class ParamTable(Mapping[str, ParamStats]):
    """One step's ``ParamStats`` by parameter name, stored as rows of doubles.

    Args:
        layout: the run's parameters.
        index: for each row, the parameter's position in ``layout``; the others got no gradient.
        rows: per row: grad L2 norm, max |g|, non-zero count, the parameter's L2 norm.
        nonfinite: position -> (NaN count, Inf count) of the gradients that hold any.
    """

    __slots__ = ("_layout", "_row", "_values", "_nonfinite")

    def __init__(
        self,
        layout: Layout,
        index: list[int],
        rows: list[list[float]],
        nonfinite: dict[int, tuple[int, int]],
    ) -> None:
        self._layout = layout
        self._row = {i: r for r, i in enumerate(index)}
        self._values = array("d", [row[c] for row in rows for c in _COLUMNS])
        self._nonfinite = dict(nonfinite)

    def __getitem__(self, name: str) -> ParamStats:
        return self._at(self._layout.position[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout.names)

    def __len__(self) -> int:
        return len(self._layout.names)

    def __contains__(self, name: object) -> bool:
        return name in self._layout.position

    def __repr__(self) -> str:
        return f"ParamTable({dict(self.items())!r})"

    def _at(self, i: int) -> ParamStats:
        r = self._row.get(i)
        if r is None:
            return NO_GRADIENT
        at = r * _WIDTH
        norm, max_abs, nonzero, param_norm = self._values[at : at + _WIDTH]
        numel = self._layout.numel[i]
        nans, infs = self._nonfinite.get(i, (0, 0))
        zero_fraction = 1.0 - nonzero / numel if numel else 0.0
        ratio = norm / param_norm if param_norm else None
        return ParamStats(norm, max_abs, zero_fraction, nans, infs, param_norm, ratio)

    def received_names(self) -> list[str]:
        """The names of the parameters that got a gradient, without making their statistics."""
        names = self._layout.names
        return [names[i] for i in self._row]

    def nonfinite(self) -> list[ParamStats]:
        """The statistics of the parameters whose gradient holds a NaN or Inf (no scan of the others)."""
        return [self._at(i) for i in self._nonfinite]


class HistogramTable(Mapping[str, Histogram]):
    """One step's gradient histograms by parameter name, stored as rows of doubles.

    Args:
        names: the parameter of each row.
        values: the rows end to end, ``width`` each: min, max, finite count, sum, sum of squares,
            non-finite count, then the bucket counts.
        width: the length of a row.
    """

    __slots__ = ("names", "values", "width", "_position")

    def __init__(self, names: list[str], values: list[float], width: int) -> None:
        self.names = tuple(names)
        self.values = array("d", values)
        self.width = width
        self._position: dict[str, int] | None = None

    def __getitem__(self, name: str) -> Histogram:
        if self._position is None:
            self._position = {n: i for i, n in enumerate(self.names)}
        at = self._position[name] * self.width
        return histogram_of(self.values[at : at + self.width])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"HistogramTable({dict(self.items())!r})"


def histogram_of(row: Sequence[float]) -> Histogram:
    """One table row (min, max, count, sum, sum of squares, non-finite count, buckets) as a ``Histogram``."""
    lo, hi, count, total, squares, nonfinite = row[:6]
    return Histogram(lo, hi, int(count), total, squares, int(nonfinite), tuple(map(int, row[6:])))


class ModuleTable(Mapping[str, ModuleStats]):
    """One step's ``ModuleStats`` by module name: each module's own parameters (not its children's),
    aggregated the first time the table is read."""

    __slots__ = ("_params", "_stats")

    def __init__(self, params: ParamTable) -> None:
        self._params = params
        self._stats: dict[str, ModuleStats] | None = None

    def _all(self) -> dict[str, ModuleStats]:
        if self._stats is None:
            layout = self._params._layout
            stats = [self._params._at(i) for i in range(len(layout.names))]
            self._stats = {module: aggregate(members, stats, layout) for module, members in layout.modules.items()}
        return self._stats

    def __getitem__(self, name: str) -> ModuleStats:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._params._layout.modules)

    def __len__(self) -> int:
        return len(self._params._layout.modules)

    def __repr__(self) -> str:
        return f"ModuleTable({self._all()!r})"


def aggregate(members: list[int], stats: list[ParamStats], layout: Layout) -> ModuleStats:
    """A module's parameters' statistics combined: norms as sqrt of summed squares."""
    grad_sq = param_sq = zeros = 0.0
    numel = received = nans = infs = 0
    max_abs: float | None = None
    for i in members:
        s = stats[i]
        if s.grad_norm is None:
            continue
        received += 1
        grad_sq += s.grad_norm * s.grad_norm
        param_sq += s.param_norm * s.param_norm  # type: ignore[operator]
        zeros += s.zero_fraction * layout.numel[i]  # type: ignore[operator]
        numel += layout.numel[i]
        nans, infs = nans + s.nan_count, infs + s.inf_count
        max_abs = s.grad_max_abs if max_abs is None else max(max_abs, s.grad_max_abs)  # type: ignore[type-var]
    if not received:
        return ModuleStats(None, None, None, 0, 0, None, None, len(members), 0)
    grad_norm, param_norm = math.sqrt(grad_sq), math.sqrt(param_sq)
    return ModuleStats(
        grad_norm=grad_norm,
        grad_max_abs=max_abs,
        zero_fraction=zeros / numel if numel else 0.0,
        nan_count=nans,
        inf_count=infs,
        param_norm=param_norm,
        grad_to_param=grad_norm / param_norm if param_norm else None,
        parameters=len(members),
        with_grad=received,
    )


def received(params: Mapping[str, ParamStats]) -> list[str]:
    """The names of the parameters that got a gradient (a ParamTable reads its rows, makes no objects)."""
    if isinstance(params, ParamTable):
        return params.received_names()
    return [name for name, s in params.items() if s.received]


def grad_to_param(params: Mapping[str, ParamStats], names: list[str]) -> list[tuple[str, float]]:
    """|grad| / |weight| of each named parameter whose gradient and weight are both non-zero."""
    if not isinstance(params, ParamTable):
        stats = [(name, params.get(name)) for name in names]
        return [(n, s.grad_norm / s.param_norm) for n, s in stats if s is not None and s.grad_norm and s.param_norm]
    out, values, rows, position = [], params._values, params._row, params._layout.position
    for name in names:
        r = rows.get(position.get(name, -1))
        if r is not None:
            norm, param_norm = values[r * _WIDTH], values[r * _WIDTH + 3]
            if norm and param_norm:
                out.append((name, norm / param_norm))
    return out


def nonfinite(params: Mapping[str, ParamStats]) -> list[ParamStats]:
    """The parameters' statistics whose gradient holds a NaN or Inf (a ParamTable knows them without a scan)."""
    if isinstance(params, ParamTable):
        return params.nonfinite()
    return [s for s in params.values() if s.nan_count or s.inf_count]
