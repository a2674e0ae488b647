"""The report's JSON form: strict JSON, stable paths, and a lossless round trip."""

import json
import math

import gradscope
from gradscope.report import Anomaly, Report
from tests.conftest import config, target


def test_round_trip_and_strict_json():
    report = gradscope.inspect(config("gradscope.zoo:mlp", {"in_features": 8, "depth": 2, "classes": 4}, steps=2))
    text = json.dumps(report.to_dict(), allow_nan=False)
    again = Report.from_dict(json.loads(text))
    assert again == report


def test_nonfinite_values_become_strings_and_come_back():
    report = gradscope.inspect(config(steps=1))
    step = report.steps[0]
    name = next(iter(step.parameters))
    bad = step.parameters[name].__class__(math.nan, math.inf, 0.0, 3, 1, 1.0, math.nan)
    broken = Report(
        report.run,
        report.parameters,
        (step.__class__(**{**step.__dict__, "parameters": {**step.parameters, name: bad}, "loss": -math.inf}),),
        (Anomaly(kind="nonfinite_gradient", severity="error", message="m", evidence={"value": math.nan}),),
    )
    data = json.loads(json.dumps(broken.to_dict(), allow_nan=False))
    assert data["steps"][0]["parameters"][name]["grad_norm"] == "nan"
    assert data["steps"][0]["parameters"][name]["grad_max_abs"] == "inf"
    assert data["steps"][0]["loss"] == "-inf"
    back = Report.from_dict(data)
    assert math.isnan(back.steps[0].parameters[name].grad_norm)
    assert back.steps[0].loss == -math.inf


def test_stable_paths():
    data = gradscope.inspect(config(model=target("WithUnused"))).to_dict()
    step = data["steps"][0]
    assert set(data) >= {"schema_version", "run", "parameters", "steps", "anomalies"}
    assert {"step", "loss", "grad_norm_total", "parameters", "modules"} <= set(step)
    assert step["parameters"]["spare.weight"]["grad_norm"] is None
    assert step["parameters"]["used.weight"]["grad_norm"] > 0


def test_at_or_above():
    report = gradscope.inspect(config())
    found = (
        Anomaly(kind="a", severity="info", message=""),
        Anomaly(kind="b", severity="warning", message=""),
        Anomaly(kind="c", severity="error", message=""),
    )
    report = Report(report.run, report.parameters, report.steps, found)
    assert [a.kind for a in report.at_or_above("warning")] == ["b", "c"]
    assert [a.kind for a in report.at_or_above("info")] == ["a", "b", "c"]
    assert report.at_or_above("never") == []


def test_an_inf_origin_reads_back_with_its_kind_as_text():
    """An origin's ``kind`` is the text "inf" or "nan", not a number, also after the round trip."""
    model = config("gradscope.faults:ScaledOutput", {"scale": 1e39, "in_features": 8, "hidden": 8, "classes": 4})
    report = gradscope.inspect(
        {**model, "loss": "mse", "data": {"batch_size": 4, "input": {"shape": [8]}, "labels": {"shape": [4]}}}
    )
    (origin,) = [s.origin for s in report.steps if s.origin is not None]
    assert origin.kind == "inf"
    again = Report.from_dict(json.loads(json.dumps(report.to_dict(), allow_nan=False)))
    assert again.steps[0].origin == origin and again.to_dict() == report.to_dict()
