"""Reported numbers against an independent computation (plain PyTorch, no gradscope)."""

import math

import pytest
import torch

import gradscope
from gradscope.config import settings_from_dict
from tests.conftest import config, norm64, reference_grads, reference_model, target

MODELS = {
    "mlp": config("gradscope.zoo:mlp", {"in_features": 8, "hidden": 16, "depth": 3, "classes": 4}),
    "deep_sigmoid": config(
        "gradscope.zoo:mlp", {"in_features": 8, "hidden": 16, "depth": 30, "classes": 4, "activation": "sigmoid"}
    ),
    "cnn": config(
        "gradscope.zoo:cnn",
        {"in_channels": 3, "width": 4, "classes": 4},
        data={"batch_size": 4, "input": {"shape": [3, 8, 8]}, "labels": {"classes": 4}},
    ),
    "resnet": config(
        "gradscope.zoo:resnet",
        {"in_channels": 3, "width": 4, "stages": [1, 1], "classes": 4},
        data={"batch_size": 4, "input": {"shape": [3, 8, 8]}, "labels": {"classes": 4}},
    ),
    "transformer": config(
        "gradscope.zoo:transformer_lm",
        {"vocab": 32, "d_model": 16, "n_layers": 2, "n_heads": 2, "max_len": 8},
        data={"batch_size": 2, "input": {"tokens": {"vocab": 32, "length": 8}}, "labels": "next_token"},
    ),
    "lstm": config(
        target("Lstm"),
        data={"batch_size": 4, "input": {"tokens": {"vocab": 64, "length": 6}}, "labels": {"classes": 5}},
    ),
}


def check_against_reference(raw: dict, scale: bool = False, rel: float = 1e-6) -> gradscope.Report:
    settings = settings_from_dict(raw)
    report = gradscope.inspect(settings)
    expected = reference_grads(settings, scale=scale)
    step = report.steps[0]
    for name, stats in step.parameters.items():
        grad = expected[name]
        assert stats.grad_norm == pytest.approx(norm64(grad), rel=rel, abs=1e-30), name
        assert stats.grad_max_abs == pytest.approx(grad.abs().max().item(), rel=rel, abs=1e-30), name
        zeros = (grad == 0).sum().item() / grad.numel()
        assert stats.zero_fraction == pytest.approx(zeros, abs=1e-9), name
    total = math.sqrt(sum(norm64(g) ** 2 for g in expected.values()))
    assert step.grad_norm_total == pytest.approx(total, rel=rel)
    return report


@pytest.mark.parametrize("name", sorted(MODELS))
def test_norms_match_plain_pytorch_fp32(name):
    check_against_reference(MODELS[name])


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_norms_match_plain_pytorch_under_bf16_autocast(name):
    check_against_reference({**MODELS[name], "precision": "bf16"})


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_fp16_norms_are_the_unscaled_gradients(name):
    report = check_against_reference({**MODELS[name], "precision": "fp16"}, scale=True, rel=1e-5)
    step = report.steps[0]
    assert step.loss_scale == 65536.0
    assert step.skipped is False


def test_vanishing_gradients_are_not_flushed_to_zero():
    # In float32, vector_norm of gradients ~1e-27 is exactly 0 (the squares underflow).
    report = check_against_reference(MODELS["deep_sigmoid"])
    first = report.steps[0].parameters["inp.weight"]
    assert 0 < first.grad_norm < 1e-15
    assert torch.linalg.vector_norm(torch.full((4,), first.grad_max_abs)).item() == 0.0


def test_param_norm_and_ratio():
    settings = settings_from_dict(MODELS["mlp"])
    report = gradscope.inspect(settings)
    model = gradscope.loading.build_model(settings)
    for name, p in model.named_parameters():
        stats = report.steps[0].parameters[name]
        assert stats.param_norm == pytest.approx(norm64(p.detach()), rel=1e-6)
        assert stats.grad_to_param == pytest.approx(stats.grad_norm / stats.param_norm)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
def test_clip_numbers_match_clip_grad_norm(norm_type):
    raw = {**MODELS["mlp"], "clip": {"max_norm": 0.05, "norm_type": norm_type}}
    settings = settings_from_dict(raw)
    step = gradscope.inspect(settings).steps[0]
    params = [p for p in reference_model(settings).parameters() if p.grad is not None]
    expected_norm = torch.nn.utils.clip_grad_norm_(params, 0.05, norm_type).item()
    grads = [p.grad for p in params]
    assert step.clip_norm == pytest.approx(expected_norm, rel=1e-5)
    clipped_total = math.sqrt(sum(norm64(g) ** 2 for g in grads))  # grads were clipped in place
    assert step.grad_norm_total_clipped == pytest.approx(clipped_total, rel=1e-5)
    assert step.clip_coefficient == pytest.approx(min(1.0, 0.05 / (expected_norm + 1e-6)), rel=1e-5)
    assert step.grad_norm_total > step.grad_norm_total_clipped


def test_clipping_changes_what_the_optimizer_applies():
    raw = {**MODELS["mlp"], "steps": 2, "optimizer": {"name": "sgd", "lr": 0.1}}
    free = gradscope.inspect(raw)
    clipped = gradscope.inspect({**raw, "clip": {"max_norm": 1e-3}})
    assert free.steps[0].loss == clipped.steps[0].loss
    assert free.steps[1].loss != clipped.steps[1].loss


def test_tied_weights_counted_once_under_first_name():
    report = check_against_reference(MODELS["transformer"])
    names = [p.name for p in report.parameters]
    assert "lm_head.weight" not in names
    tok = next(p for p in report.parameters if p.name == "tok.weight")
    assert tok.aliases == ("lm_head.weight",)
    assert "lm_head.weight" not in report.steps[0].parameters


def test_unused_and_frozen_parameters():
    report = gradscope.inspect(config(target("WithUnused")))
    step = report.steps[0]
    assert step.parameters["spare.weight"].grad_norm is None
    assert step.parameters["spare.weight"].received is False
    assert step.parameters["used.weight"].received
    assert "frozen.weight" not in step.parameters
    frozen = next(p for p in report.parameters if p.name == "frozen.weight")
    assert frozen.trainable is False
    assert report.run.parameters_trainable == 4 * 8 + 4 + 4 * 8 + 4
    assert step.modules["spare"].with_grad == 0 and step.modules["spare"].grad_norm is None


def test_detached_parameters_get_no_gradient():
    step = gradscope.inspect(config(target("Detached"))).steps[0]
    assert step.parameters["cut.weight"].grad_norm is None
    assert step.parameters["head.weight"].grad_norm > 0


def test_module_called_twice_accumulates_both_uses():
    check_against_reference(config(target("CalledTwice")))


def test_module_aggregates_combine_their_parameters():
    step = gradscope.inspect(MODELS["mlp"]).steps[0]
    for module, agg in step.modules.items():
        own = [s for n, s in step.parameters.items() if n.rpartition(".")[0] == module]
        assert agg.grad_norm == pytest.approx(math.sqrt(sum(s.grad_norm**2 for s in own)))
        assert agg.grad_max_abs == max(s.grad_max_abs for s in own)
        assert agg.parameters == len(own)


def test_checkpointing_gives_the_same_gradients():
    raw = MODELS["transformer"]
    plain = gradscope.inspect(raw).steps[0]
    ckpt = gradscope.inspect({**raw, "checkpointing": {"modules": ["blocks.*"]}})
    assert ckpt.run.checkpointed_modules == ("blocks.0", "blocks.1")
    for name, stats in plain.parameters.items():
        assert ckpt.steps[0].parameters[name].grad_norm == pytest.approx(stats.grad_norm, rel=1e-5)


def test_same_config_same_numbers():
    raw = {**MODELS["mlp"], "steps": 2, "optimizer": {"name": "adam", "lr": 1e-2}}
    first, second = gradscope.inspect(raw), gradscope.inspect(raw)
    assert first.to_dict()["steps"] == second.to_dict()["steps"]


def test_optimizer_steps_change_the_loss_and_no_optimizer_keeps_it():
    raw = {**MODELS["mlp"], "steps": 3}
    kept = gradscope.inspect(raw)
    assert len({s.loss for s in kept.steps}) == 1
    trained = gradscope.inspect({**raw, "optimizer": {"name": "sgd", "lr": 0.5}})
    assert trained.steps[2].loss < trained.steps[0].loss


def test_nonfinite_gradients_are_counted_exactly():
    raw = config(target("CalledTwice"), data={"batch_size": 4, "input": {"shape": [8]}, "labels": {"classes": 4}})
    settings = settings_from_dict(raw)
    inspection = gradscope.Inspection(settings)
    with torch.no_grad():
        inspection.model.head.weight[0, 0] = float("inf")  # logits become inf/nan
    report = inspection.run()
    head = report.steps[0].parameters["head.weight"]
    assert head.nan_count + head.inf_count > 0
    assert not math.isfinite(head.grad_norm)
    assert math.isfinite(head.grad_max_abs)
    grad = inspection.model.head.weight.grad
    assert head.nan_count == grad.isnan().sum().item()
    assert head.inf_count == grad.isinf().sum().item()


def test_fp16_overflow_skips_the_step_and_records_the_scale():
    raw = {**MODELS["mlp"], "precision": "fp16", "steps": 2, "optimizer": {"name": "sgd", "lr": 0.1}}
    inspection = gradscope.Inspection(settings_from_dict(raw))
    with torch.no_grad():
        inspection.model.out.weight.mul_(1e4)  # scaled fp16 gradients overflow
    report = inspection.run()
    first, second = report.steps
    assert first.skipped is True
    assert first.loss_scale == 65536.0
    assert second.loss_scale == 32768.0  # the scaler backed off by its factor of 0.5
    assert any(s.inf_count or s.nan_count for s in first.parameters.values())


def test_steps_the_scaler_skips_are_recorded_once():
    raw = {**MODELS["mlp"], "precision": "fp16", "steps": 3, "optimizer": {"name": "sgd", "lr": 0.1}}
    inspection = gradscope.Inspection(settings_from_dict(raw))
    with torch.no_grad():
        inspection.model.out.weight.mul_(1e4)  # every step overflows and is skipped
    report = inspection.run()
    assert [(s.step, s.skipped) for s in report.steps] == [(0, True), (1, True), (2, True)]
    assert all(s.loss is not None for s in report.steps)
