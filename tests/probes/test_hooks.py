"""The user's model is left as it was: hooks off and forwards restored, also after errors."""

import pytest
import torch

import gradscope
from gradscope.config import settings_from_dict
from gradscope.errors import ModelError
from gradscope.probes.gradients import GradientProbe
from tests.conftest import config, target


def assert_untouched(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None), f"hook left on {name}"
    for name, module in model.named_modules():
        assert "forward" not in module.__dict__, f"forward left patched on {name!r}"
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks


def test_hooks_removed_after_a_run():
    raw = config(
        "gradscope.zoo:mlp", {"in_features": 8, "depth": 2, "classes": 4}, checkpointing={"modules": ["blocks.*"]}
    )
    inspection = gradscope.Inspection(settings_from_dict(raw))
    inspection.run()
    assert_untouched(inspection.model)


@pytest.mark.parametrize("error, raised", [("RuntimeError", ModelError), ("KeyboardInterrupt", KeyboardInterrupt)])
def test_hooks_removed_and_steps_kept_after_a_run_that_raised(error, raised):
    raw = config(target("FailsOnCall"), {"call": 2, "error": error}, steps=3, checkpointing={"modules": ["lin"]})
    inspection = gradscope.Inspection(settings_from_dict(raw))
    with pytest.raises(raised):
        inspection.run()
    assert_untouched(inspection.model)
    report = inspection.report()
    assert len(report.steps) == 1
    assert report.run.status == ("interrupted" if error == "KeyboardInterrupt" else "failed")


def test_probe_removes_hooks_on_exception_inside_block():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError), GradientProbe(model):
        assert model.weight._post_accumulate_grad_hooks
        raise ValueError("user code failed")
    assert_untouched(model)


def test_probe_records_arrival_per_backward():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    with GradientProbe(model) as probe:
        probe.begin_step()
        model[1](torch.randn(2, 3)).sum().backward()
        assert [probe.names[i] for i in probe.arrived()] == ["1.weight", "1.bias"]
        probe.begin_step()
        model(torch.randn(2, 3)).sum().backward()
        assert len(probe.arrived()) == 4
