"""A watched loop that clips reports its clipping as ``inspect`` does: ``run.clip`` and each step's
``clip_norm``, told by the factor the clipping applied (checked against what ``clip_grad_norm_`` returned)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradscope
from tests.integrations.test_lightning import Regressor, fit
from tests.integrations.test_transformers import gpt2, trainer
from tests.trainer_setup import fresh_accelerate  # noqa: F401 (a fixture)


def clipped_loop(
    max_norms: list[float], norm_type: float = 2.0, loss_scales: list[float] | None = None
) -> tuple[gradscope.Watch, list[float]]:
    """One step per ``max_norms`` entry, clipped at it (the loss times ``loss_scales``' entry); the
    norms ``clip_grad_norm_`` returned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 4
    returned = []
    with gradscope.watch(model, opt) as scope:
        for max_norm, loss_scale in zip(max_norms, loss_scales or [1.0] * len(max_norms), strict=True):
            opt.zero_grad()
            (nn.functional.cross_entropy(model(x), y) * loss_scale).backward()
            returned.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type).item())
            opt.step()
    return scope, returned


def test_a_watched_loop_that_clips_reports_max_norm_and_each_steps_clip_norm():
    scope, returned = clipped_loop([0.05] * 30)
    report = scope.report
    assert report.run.clip == {"max_norm": 0.05, "norm_type": 2.0}
    assert len(report.steps) < 30  # the steps kept in full
    for step in report.steps:
        norm = returned[step.step]
        assert step.clip_norm == pytest.approx(norm, rel=1e-5)
        assert step.clip_coefficient == pytest.approx(0.05 / (norm + 1e-6), rel=1e-4)


def test_the_max_norm_clipping_is_told_from_the_l2():
    scope, returned = clipped_loop([0.02] * 12, norm_type=math.inf)
    report = scope.report
    assert report.run.clip == {"max_norm": 0.02, "norm_type": math.inf}
    # The first clipped step alone cannot tell the two apart: its clip_norm is the L2 total.
    for step in report.steps[1:]:
        assert step.clip_norm == pytest.approx(returned[step.step], rel=1e-5)


def test_steps_under_max_norm_show_a_coefficient_of_one():
    scope, returned = clipped_loop([0.05] * 6, loss_scales=[1.0] * 3 + [1e-3] * 3)  # then gradients under it
    steps = scope.report.steps
    assert [s.clip_coefficient for s in steps[3:]] == [1.0, 1.0, 1.0]
    assert [s.clip_norm for s in steps[3:]] == pytest.approx(returned[3:], rel=1e-5)
    assert [s.grad_norm_total_clipped for s in steps[3:]] == pytest.approx(returned[3:], rel=1e-5)


def test_a_max_norm_that_changes_every_step_is_not_reported_as_one():
    scope, _ = clipped_loop([0.05, 0.04, 0.03, 0.02, 0.01])
    report = scope.report
    assert report.run.clip is None
    assert all(s.clip_coefficient < 1.0 for s in report.steps)  # each step's clipping is still seen


def test_a_loop_that_does_not_clip_reports_no_clipping():
    scope, _ = clipped_loop([1e6] * 5)
    assert scope.report.run.clip is None
    assert all(s.clip_norm is None and s.clip_coefficient is None for s in scope.report.steps)


def test_lightning_gradient_clip_val_is_the_reports_clip():
    from gradscope.integrations.lightning import GradscopeCallback

    callback = GradscopeCallback()
    fit(Regressor(), callback, gradient_clip_val=0.05)
    assert callback.report.run.clip == {"max_norm": 0.05, "norm_type": 2.0}


@pytest.mark.usefixtures("fresh_accelerate")
def test_hugging_face_max_grad_norm_is_the_reports_clip(tmp_path):
    from gradscope.integrations.transformers import GradscopeCallback

    callback = GradscopeCallback()
    trainer(tmp_path, gpt2(), callback, max_grad_norm=0.01).train()
    assert callback.report.run.clip == {"max_norm": 0.01, "norm_type": 2.0}
