"""The update-ratio probe: |delta w| / |w| of each parameter, against the weights copied by hand."""

import math

import pytest
import torch

import gradscope
from gradscope.report import Report
from tests.test_syncs import SYNCING


def train(model, steps, **watch_args):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = []  # the weights each step is measured at (before its update)
    x, y = torch.randn(16, 6), torch.randint(3, (16,))
    with gradscope.watch(model, optimizer, probes=("update_ratio",), **watch_args) as scope:
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            before.append({n: p.detach().clone() for n, p in model.named_parameters()})
            optimizer.step()
    return scope, before


def test_update_ratio_is_each_weights_change_over_its_norm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    scope, before = train(model, 3)
    steps = scope.report.steps
    assert "update_ratio" not in steps[0].probes  # nothing to compare the first step with
    for n in (1, 2):
        ratios = steps[n].probes["update_ratio"]
        assert set(ratios) == {name for name, _ in model.named_parameters()}
        for name, ratio in ratios.items():
            old, new = before[n - 1][name].double(), before[n][name].double()
            expected = torch.linalg.vector_norm(new - old) / torch.linalg.vector_norm(old)
            assert ratio == pytest.approx(expected.item(), rel=1e-5)
            assert 0 < ratio < 1


def test_update_ratio_joins_the_steps_one_host_transfer(monkeypatch):
    calls = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    model = torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(10)], torch.nn.Linear(6, 3))
    train(model, 3, activations=False)
    assert calls == ["tolist"] * 3


def test_update_ratio_survives_the_json_report():
    model = torch.nn.Sequential(torch.nn.Linear(6, 3))
    scope, _ = train(model, 2)
    again = Report.from_dict(scope.report.to_dict())
    assert again.steps[1].probes == scope.report.steps[1].probes
    assert all(math.isfinite(r) for r in again.steps[1].probes["update_ratio"].values())


def test_an_unknown_probe_is_named_with_those_there_are():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="update_ratio"):
        gradscope.watch(model, probes=("update_ratios",))
