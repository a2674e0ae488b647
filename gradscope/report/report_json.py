"""The report's JSON form: ``report_dict`` writes it, ``report_from`` reads it back.

The paths are a public contract (see ``report``); non-finite floats are written as the strings
``"nan"``, ``"inf"`` and ``"-inf"`` so that the file is strict JSON.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gradscope.report import (
    ActivationStats,
    Anomaly,
    BackwardFailure,
    GradcheckResult,
    Histogram,
    ModuleStats,
    NonfiniteOrigin,
    ParamInfo,
    ParamStats,
    RankStep,
    Report,
    Retained,
    RunInfo,
    RunTotals,
    StepRecord,
    StepSeries,
)


def report_dict(report: Report) -> dict[str, Any]:
    """The JSON form (strict: non-finite floats become strings)."""
    return {
        "schema_version": report.schema_version,
        "run": _plain(dataclasses.asdict(report.run)),
        "parameters": {p.name: _plain(_without(p, "name")) for p in report.parameters},
        "steps": [step_dict(s) for s in report.steps],
        "anomalies": [_plain(dataclasses.asdict(a)) for a in report.anomalies],
        "ignored": [_plain(dataclasses.asdict(a)) for a in report.ignored],
        "gradchecks": [_plain(dataclasses.asdict(g)) for g in report.gradchecks],
        "called_modules": list(report.called_modules) if report.called_modules is not None else None,
        "retained": _plain(dataclasses.asdict(report.retained)) if report.retained is not None else None,
    }


def report_from(data: dict[str, Any]) -> Report:
    """Read back what ``to_dict`` wrote."""
    data = _unplain(data)
    run_data = data["run"]
    run = RunInfo(
        **{
            **run_data,
            "checkpointed_modules": tuple(run_data["checkpointed_modules"]),
            "notes": tuple(run_data.get("notes", ())),
        }
    )
    params = tuple(
        ParamInfo(name=name, **{**p, "shape": tuple(p["shape"]), "aliases": tuple(p["aliases"])})
        for name, p in data["parameters"].items()
    )
    steps = tuple(_step_from(s) for s in data["steps"])
    anomalies = tuple(Anomaly(**a) for a in data["anomalies"])
    called = data.get("called_modules")
    ignored = tuple(Anomaly(**a) for a in data.get("ignored", []))
    gradchecks = tuple(GradcheckResult(**g) for g in data.get("gradchecks", []))
    called = tuple(called) if called is not None else None
    retained = _retained_from(data["retained"]) if data.get("retained") else None
    return Report(run, params, steps, anomalies, called, ignored, gradchecks, data["schema_version"], retained)


_NESTED = ("parameters", "modules", "activations", "origin", "overflow", "backward_error", "histograms", "ranks")


def step_dict(step: StepRecord) -> dict[str, Any]:
    """One step's JSON form, as in ``steps[i]`` of the report."""
    out = _plain(_without(step, *_NESTED))
    for name in ("parameters", "modules", "activations", "histograms"):
        out[name] = {key: _plain(dataclasses.asdict(s)) for key, s in getattr(step, name).items()}
    for name in ("origin", "overflow", "backward_error"):
        value = getattr(step, name)
        out[name] = _plain(dataclasses.asdict(value)) if value else None
    out["ranks"] = [_plain(dataclasses.asdict(r)) for r in step.ranks]
    return out


def _step_from(data: dict[str, Any]) -> StepRecord:
    params = {name: ParamStats(**s) for name, s in data.pop("parameters").items()}
    modules = {name: ModuleStats(**s) for name, s in data.pop("modules").items()}
    activations = {name: ActivationStats(**s) for name, s in data.pop("activations").items()}
    histograms = {
        name: Histogram(**{**h, "buckets": tuple(h["buckets"])}) for name, h in data.pop("histograms", {}).items()
    }
    origin, overflow = _origin_from(data.pop("origin")), _origin_from(data.pop("overflow", None))
    failure = data.pop("backward_error")
    failure = BackwardFailure(**failure) if failure else None
    data["stale"] = tuple(data.get("stale", ()))
    ranks = tuple(RankStep(**{**r, "nonfinite": tuple(r["nonfinite"])}) for r in data.pop("ranks", ()))
    return StepRecord(
        parameters=params,
        modules=modules,
        activations=activations,
        origin=origin,
        overflow=overflow,
        backward_error=failure,
        histograms=histograms,
        ranks=ranks,
        **data,
    )


def _origin_from(data: dict[str, Any] | None) -> NonfiniteOrigin | None:
    if not data:
        return None
    return NonfiniteOrigin(**{**data, "tensors": tuple(data["tensors"]), "samples": tuple(data.get("samples", ()))})


def _retained_from(data: dict[str, Any]) -> Retained:
    totals = data["totals"]
    totals = RunTotals(
        **{
            **totals,
            "received": tuple(totals["received"]),
            "missing": tuple(totals["missing"]),
            "clipped": tuple(tuple(c) for c in totals["clipped"]),
        }
    )
    series = StepSeries(**{name: tuple(values) for name, values in data["series"].items()})
    return Retained(tuple(data["kept"]), dict(data["policy"]), totals, series)


def _without(obj: Any, *names: str) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name not in names}


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# Fields whose value is text even when it reads "nan" or "inf" (a NaN origin's ``kind``).
_TEXT = frozenset({"kind"})


def _unplain(value: Any) -> Any:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, dict):
        return {k: v if k in _TEXT else _unplain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    return value
