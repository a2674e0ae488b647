"""Activation statistics: dead ReLU units and saturated sigmoid/tanh units, per call site.

A ``TorchFunctionMode`` sees every ReLU, sigmoid and tanh however it is
called (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()``, ``clamp(min=0)``,
``clamp_min(0)``, ``nn.ReLU6``/``F.relu6``), and reduces each output on the
device in one pass: a ReLU to its firing values per unit, a sigmoid or tanh to its
saturated values. The dead units and the firing density (which tells a sparse code
from a dead one) come from the ReLUs' per-unit readings at measure time, in a few
kernels for all sites together, and join the step's one host transfer. A mode costs a Python call per op of the forward, so after the first
step, when every activation it saw was an activation module (``nn.ReLU``,
``nn.Sigmoid``, ...), forward hooks on those modules alone take over
(``ActivationProbe.module_sites``): same sites, same keys, a call per activation.
"""

from __future__ import annotations

from collections import Counter
from functools import cache
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gradscope.probes.modules import ModuleTracker, describe_call, in_backward
from gradscope.report import ActivationStats
from gradscope.utils.frames import user_site

KINDS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    torch.Tensor.relu: "relu",
    torch.Tensor.relu_: "relu",
    F.relu6: "relu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.Tensor.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.Tensor.tanh: "tanh",
}
# A clamp at 0 from below is a ReLU (PyTorch's own tutorial writes ``x.clamp(min=0)``); ReLU6 is
# ``F.hardtanh(x, 0, 6)``. Their lower bound is the second argument or ``min``/``min_val``.
CLAMPS: dict[Any, str] = {
    torch.clamp: "min",
    torch.clamp_: "min",
    torch.clip: "min",
    torch.Tensor.clamp: "min",
    torch.Tensor.clamp_: "min",
    torch.Tensor.clip: "min",
    torch.clamp_min: "min",
    torch.clamp_min_: "min",
    torch.Tensor.clamp_min: "min",
    torch.Tensor.clamp_min_: "min",
    F.hardtanh: "min_val",
}
# Modules whose forward is exactly one of the ops above.
MODULE_KINDS: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.ReLU6: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
# A sigmoid unit is saturated beyond these outputs (|x| > 4.6, where sigmoid' < 0.01);
# a tanh unit beyond |y| = 0.99 (|x| > 2.65, where tanh' < 0.02).
SIGMOID_BOUND = 0.01
TANH_BOUND = 0.99


_UNKNOWN = object()  # a hooked call whose source line the first step did not see


class _Site(NamedTuple):  # a tuple: made at every activation call of every step
    kind: str
    module: str
    call: int
    source: str | None


class ActivationProbe(TorchFunctionMode):
    """Counts dead or saturated units of each activation call during a forward pass.

    Args:
        tracker: an entered ``ModuleTracker`` on the same model.
    """

    def __init__(self, tracker: ModuleTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.paused = False  # while gradscope replays a step of its own
        self.sites: list[_Site] = []
        # Per site: a ReLU's per-unit maxima, (units,), and its values above 0 (see ``_fired``);
        # a sigmoid's or tanh's saturated values, 0-d. Counted up once per step in ``values``.
        self.readings: list[tuple[torch.Tensor, torch.Tensor] | torch.Tensor] = []
        self.hooked: dict[int, tuple[str, str]] = {}  # hook mode: id(module) -> (name, kind)
        self._sources: dict[tuple[str, int], str | None] = {}
        self.calls: Counter[str] = Counter()  # hook mode: calls of each hooked module this step
        self.shapes: list[tuple[int, int]] = []  # (units, samples)
        self._layouts: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}  # see ``_layout``

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        kind = KINDS.get(func) or _clamp_at_zero(func, args, kwargs)
        if kind is None or self.paused or in_backward():
            return out  # checkpointed modules recompute their forward in backward: counted once
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.ndim >= 2:
            self._record(kind, out.detach(), self.tracker.current)
        return out

    def reset(self) -> None:
        """Start a new step's statistics."""
        self.sites, self.readings, self.shapes = [], [], []
        self.calls.clear()

    def module_sites(self, model: nn.Module) -> dict[nn.Module, str] | None:
        """After a step under the mode: the model's activation modules (name by module) when they made
        every site it saw, or None when some activation was a function call (``F.relu``...)."""
        modules = dict(model.named_modules())
        for site in self.sites:
            module = modules.get(site.module)
            if module is None or MODULE_KINDS.get(type(module)) != site.kind:
                return None
        # Every activation module, also those this step did not call (a branch taken later).
        return {module: name for name, module in modules.items() if type(module) in MODULE_KINDS}

    def hook(self, sites: dict[nn.Module, str]) -> list[Any]:
        """Record through forward hooks on ``sites`` instead of the mode; the hooks' handles."""
        self.hooked = {id(m): (name, MODULE_KINDS[type(m)]) for m, name in sites.items()}
        self._sources = {(site.module, site.call): site.source for site in self.sites}  # the lines that call them
        return [m.register_forward_hook(self._module_output) for m in sites]

    def _module_output(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.paused or in_backward():
            return
        name, kind = self.hooked[id(module)]
        self.calls[name] += 1
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.ndim >= 2:
            where = (name, self.calls[name])
            self._record(kind, out.detach(), where, self._sources.get(where, _UNKNOWN))

    def _record(self, kind: str, out: torch.Tensor, where: tuple[str, int] | None, source: Any = None) -> None:
        unit_dim, samples = _unit_dims(out.ndim)
        where = where or ("", 0)
        if source is None or source is _UNKNOWN:
            site = user_site()
            source = f"{site[0]}:{site[1]}" if site else None
        self.sites.append(_Site(kind, where[0], where[1], source))
        units, numel = out.shape[unit_dim], out.numel()
        # Dead ReLUs are counted per unit; saturation per value, since every saturated value
        # cuts its own gradient: fractions are of ``units`` and of all values respectively.
        if kind == "relu":
            self.readings.append((out.amax(dim=samples), _fired(out, numel)))
        elif kind == "sigmoid":
            self.readings.append(((out < SIGMOID_BOUND) | (out > 1 - SIGMOID_BOUND)).sum())
        else:
            self.readings.append((out.abs() > TANH_BOUND).sum())
        self.shapes.append((units if kind == "relu" else numel, numel // max(units, 1)))

    def values(self, ranks: Any = None) -> list[torch.Tensor]:
        """What the step fetches: each site's count (dead units or saturated values; over every
        rank's slice of the batch when ``ranks`` is given), then each site's firing values (0 for
        a sigmoid or tanh), as two (sites,) float64 tensors."""
        if not self.sites:
            return []
        relu = [i for i, site in enumerate(self.sites) if site.kind == "relu"]
        rest = [i for i, site in enumerate(self.sites) if site.kind != "relu"]
        pairs: list[Any] = [self.readings[i] for i in relu]
        some = (pairs[0][0] if relu else self.readings[rest[0]]).new_zeros(0, dtype=torch.float64)
        order, lengths = self._layout(relu, rest, [p[0].numel() for p in pairs], some.device)
        dead, fires = (
            _relu_counts([p[0] for p in pairs], [p[1] for p in pairs], lengths, ranks) if relu else (some, some)
        )
        saturated = torch.stack([self.readings[i] for i in rest]).double() if rest else some
        if ranks is not None and rest:
            saturated = ranks.reduce_sum(saturated)  # saturated values add up over the ranks
        counts = torch.cat([dead, saturated]).index_select(0, order)
        fires = torch.cat([fires, saturated.new_zeros(len(rest))]).index_select(0, order)
        return [counts, fires]

    def _layout(self, relu: list[int], rest: list[int], units: list[int], device: torch.device) -> Any:
        """The index that puts (ReLU sites, other sites) back in site order, and the ReLU sites' unit
        counts, on ``device``; kept while the sites stay the same, so a step copies nothing to it. The key
        holds both kinds of sites: a step of fewer micro-batches (an accumulation cut short at the end
        of an epoch) has fewer sigmoid/tanh sites, and an index kept from a longer step overruns it."""
        key = (tuple(relu), len(rest), tuple(units), device)
        if key not in self._layouts:
            order = torch.tensor([*relu, *rest], device=device).argsort()
            self._layouts = {key: (order, torch.tensor(units, device=device))}
        return self._layouts[key]

    def results(self, values: list[float], world: int = 1) -> dict[str, ActivationStats]:
        """Key each site by module, call and source line, given the fetched ``values`` (over
        ``world`` ranks' equal slices of the batch)."""
        out = {}
        calls = self.calls if self.hooked else self.tracker.calls
        counts, fires = values[: len(self.sites)], values[len(self.sites) :]
        for site, count, fired, (total, samples) in zip(self.sites, counts, fires, self.shapes):
            if site.kind != "relu":
                total *= world  # saturated values are counted over every rank's values
            samples *= world
            units = total if site.kind == "relu" else total // max(samples, 1)
            module = describe_call(site.module or "(model)", site.call, calls[site.module])
            key = f"{module}:{site.kind}" + (f"@{site.source.rpartition('/')[2]}" if site.source else "")
            density = fired / max(units * samples, 1) if site.kind == "relu" else None
            stats = ActivationStats(site.kind, module, site.source, units, samples, count / total, density)
            out[_unique(key, out)] = stats
        return out


@cache
def _unit_dims(ndim: int) -> tuple[int, tuple[int, ...]]:
    """The unit dimension of an ``ndim``-d output and its sample dimensions: units are features,
    channels of (N, C, H, W[, D]) maps, else the last dimension."""
    unit_dim = 1 if ndim >= 4 else ndim - 1
    return unit_dim, tuple(d for d in range(ndim) if d != unit_dim)


def _fired(out: torch.Tensor, numel: int) -> torch.Tensor:
    """How many of a ReLU's values are above 0, a 0-d float: ``sign`` and a sum are one pass, a
    third the time of ``(out > 0).sum()``. ``sign`` is 0 for NaN, as ``NaN > 0`` is false; it is -1
    only where a clamp's upper bound is below 0, whose values are then all that bound (none
    fires: ``_relu_counts`` clamps the count at 0). A sum of ones is exact in float32 below 2**24."""
    signs = out.sign()
    if out.dtype == torch.float64 or (out.dtype == torch.float32 and numel < 2**24):
        return signs.sum()  # no dtype argument: it costs a microsecond per call on a small output
    return signs.sum(dtype=torch.float32 if numel < 2**24 else torch.float64)


def _relu_counts(
    maxima: list[torch.Tensor], fired: list[torch.Tensor], lengths: torch.Tensor, ranks: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each ReLU site's dead units and firing values, (relu sites,) float64 each, from its per-unit
    maxima (``lengths`` of them each) and its count of values above 0, in a few kernels for every
    site together. A unit is
    dead when its max is <= 0 (a NaN max is not); with ``ranks``, when it is dead on every rank,
    and firing values add up."""
    dead = (torch.cat(maxima) <= 0).double()
    if ranks is not None:
        dead = ranks.reduce_dead_units(dead).double()
    counts = torch.segment_reduce(dead, "sum", lengths=lengths, initial=0.0)
    fires = torch.stack(fired).double().clamp_min(0.0)
    return counts, fires if ranks is None else ranks.reduce_sum(fires)


def _clamp_at_zero(func: Any, args: Any, kwargs: Any) -> str | None:
    """ "relu" for a clamp whose lower bound is the number 0 (``clamp(min=0)``, ``hardtanh(x, 0, 6)``)."""
    key = CLAMPS.get(func)
    if key is None:
        return None
    low = args[1] if len(args) > 1 else (kwargs or {}).get(key)
    return "relu" if isinstance(low, (int, float)) and not isinstance(low, bool) and low == 0 else None


def _unique(key: str, taken: dict[str, Any]) -> str:
    if key not in taken:
        return key
    n = 2
    while f"{key}#{n}" in taken:
        n += 1
    return f"{key}#{n}"
