"""Compact step records: the tables read back the numbers torch computes of each gradient."""

import math

import pytest
import torch

import gradscope
from gradscope import zoo
from gradscope.report import Report
from gradscope.tables import NO_GRADIENT, ModuleTable, ParamTable
from tests.conftest import norm64


def _one_step():
    torch.manual_seed(0)
    model = zoo.MLP(in_features=8, hidden=8, depth=3, classes=4)
    model.blocks[1].linear.bias.requires_grad_(False)
    frozen_out = torch.nn.Linear(4, 4)  # a parameter of the model that no loss reaches
    model.unused = frozen_out
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer, activations=False) as scope:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(16, 8)), torch.randint(4, (16,))).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
    return model, scope.report, grads, weights


def test_parameter_table_matches_each_gradient():
    model, report, grads, weights = _one_step()
    params = report.steps[0].parameters
    assert isinstance(params, ParamTable)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(params) == trainable and len(params) == len(trainable)
    assert "blocks.1.linear.bias" not in params
    for name in trainable:
        s = params[name]
        if name not in grads:
            assert s == NO_GRADIENT
            continue
        g = grads[name]
        assert s.grad_norm == pytest.approx(norm64(g), rel=1e-6)
        assert s.grad_max_abs == pytest.approx(g.abs().max().item(), rel=1e-6)
        assert s.zero_fraction == pytest.approx((g == 0).double().mean().item())
        assert s.param_norm == pytest.approx(norm64(weights[name]), rel=1e-6)
        assert s.grad_to_param == pytest.approx(norm64(g) / norm64(weights[name]), rel=1e-6)
    assert params["unused.weight"] == NO_GRADIENT


def test_module_table_combines_each_modules_own_parameters():
    model, report, grads, _ = _one_step()
    modules = report.steps[0].modules
    assert isinstance(modules, ModuleTable)
    for module, _ in model.named_modules():
        own = [n for n, p in model.named_parameters() if n.rpartition(".")[0] == module and p.requires_grad]
        if not own:
            assert module not in modules
            continue
        got = [n for n in own if n in grads]
        stats = modules[module]
        assert (stats.parameters, stats.with_grad) == (len(own), len(got))
        if got:
            assert stats.grad_norm == pytest.approx(math.sqrt(sum(norm64(grads[n]) ** 2 for n in got)), rel=1e-6)
        else:
            assert stats.grad_norm is None


def test_tables_survive_the_json_round_trip_as_equal_dicts():
    _, report, _, _ = _one_step()
    again = Report.from_dict(report.to_dict())
    assert again.steps[0].parameters == report.steps[0].parameters
    assert again.steps[0].modules == report.steps[0].modules
    assert type(again.steps[0].parameters) is dict
