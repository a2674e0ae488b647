"""Which samples of a batch made a NaN: the rows that hold it at the origin op."""

import pytest
import torch

import gradscope
from tests import models
from tests.conftest import config, target

FAULTS = [("LogOfScale", "log", "torch.log"), ("UnitRows", "zero", "Tensor.div")]


def nan_finding(report):
    (finding,) = [a for a in report.anomalies if a.kind.startswith("nonfinite")]
    return finding


@pytest.mark.parametrize(("model", "fault", "op"), FAULTS)
def test_inspect_names_the_two_rows(model, fault, op):
    raw = config(target(model), {}, data={"target": f"{target('rows_batch')}", "args": {"fault": fault}})
    finding = nan_finding(gradscope.inspect(raw))
    assert finding.kind == "nonfinite_forward" and finding.evidence["op"] == op
    assert finding.evidence["samples"] == (2, 5)
    assert "batch samples 2, 5" in finding.message


@pytest.mark.parametrize(("model", "fault", "op"), FAULTS)
def test_watch_names_the_two_rows(model, fault, op):
    torch.manual_seed(0)
    net = getattr(models, model)()
    x, y = models.rows_batch(fault, rows=(1, 6))
    with gradscope.watch(net) as scope:
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        scope.step(loss)
    finding = nan_finding(scope.report)
    assert finding.evidence["samples"] == (1, 6)
    assert finding.evidence["op"] == op
    assert "batch samples 1, 6" in finding.message
    data = scope.report.to_dict()
    assert data["steps"][0]["origin"]["samples"] == [1, 6]
    assert gradscope.Report.from_dict(data).steps[0].origin.samples == (1, 6)


def test_a_nan_in_the_batch_names_its_rows():
    x, y = models.rows_batch("log", rows=())
    x[4, 3] = float("nan")
    net = models.UnitRows()
    with gradscope.watch(net) as scope:
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        scope.step(loss)
    finding = nan_finding(scope.report)
    assert finding.evidence["samples"] == (4,) and "batch sample 4 " in finding.message


def test_many_rows_are_counted_not_listed():
    x, y = models.rows_batch("zero", rows=tuple(range(10)), batch=16)
    net = models.UnitRows()
    with gradscope.watch(net) as scope:
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        scope.step(loss)
    finding = nan_finding(scope.report)
    assert finding.evidence["samples"] == tuple(range(10)) and "10 samples of the batch" in finding.message
