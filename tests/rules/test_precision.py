"""fp16 with a grad scaler: calibration is not a fault, steps are numbered as run, one fault one finding."""

import re

import pytest

import gradscope
from gradscope.config import load_config
from gradscope.errors import ConfigError
from tests.conftest import CONFIGS
from tests.locate.test_auxiliary import lm

OVERFLOW = CONFIGS / "faults" / "fp16_overflow.yaml"


def test_fp16_steps_are_numbered_as_they_ran():
    """``steps: 3`` under fp16 with every step skipped was reported as steps 0, 2, 4."""
    report = gradscope.inspect(load_config(OVERFLOW, {"steps": 3}))
    assert [s.step for s in report.steps] == [0, 1, 2]
    assert all(s.skipped for s in report.steps)
    assert [s.loss_scale for s in report.steps] == [65536.0, 32768.0, 16384.0]


def test_scaler_calibration_is_not_a_fault():
    """The first skips, while the scale falls from 65536 toward its working value, are what a grad
    scaler does: at most an info, whatever share of a short run they are."""
    report = gradscope.inspect(load_config(OVERFLOW, {"steps": 3}))
    (finding,) = [a for a in report.anomalies if a.kind == "loss_scale_overflow"]
    assert finding.severity == "info" and "calibrated" in finding.message
    assert finding.evidence["calibration_steps"] == [0, 1, 2]
    assert not report.at_or_above("warning")


def test_skips_that_follow_a_nan_made_after_calibration_belong_to_its_finding():
    report = gradscope.inspect(load_config(OVERFLOW, {"steps": 24, "optimizer": {"name": "sgd", "lr": 0.01}}))
    steps = {s.step: s for s in report.steps}
    applied = min(i for i, s in steps.items() if not s.skipped)
    (origin,) = [a for a in report.anomalies if a.kind.startswith("nonfinite")]
    # The x1000 logits blow the weights up once steps apply: the skips of those steps are the NaN's.
    assert origin.step > applied
    assert not [a for a in report.anomalies if a.kind == "loss_scale_overflow" and a.severity != "info"]


def test_a_skip_after_calibration_names_where_the_scaled_gradient_overflowed(tmp_path):
    """The step is replayed with its loss times the scaler's scale; the first backward node that made
    an Inf from finite gradients is named, and its count is the one the gradient probe saw in .grad."""
    report = gradscope.inspect(load_config(OVERFLOW))
    located = [s for s in report.steps if s.overflow is not None]
    (step,) = located  # searched once, and not during calibration
    applied = min(s.step for s in report.steps if not s.skipped)
    assert step.skipped and step.step > applied
    overflow = step.overflow
    assert (overflow.phase, overflow.kind, overflow.module, overflow.node) == (
        "backward",
        "inf",
        "out",
        "AddmmBackward0",
    )
    assert overflow.dtype == "float16" and "zoo.py" in overflow.source
    infs = {name: s.inf_count for name, s in step.parameters.items() if s.inf_count}
    assert set(infs) == {"out.weight"} and overflow.count == infs["out.weight"]
    (finding,) = [a for a in report.anomalies if a.kind == "loss_scale_overflow"]
    assert finding.module == "out" and "first overflowed in backward at AddmmBackward0 in out" in finding.message
    assert finding.evidence["overflow"]["step"] == step.step
    path = tmp_path / "r.json"
    report.save(str(path))
    from gradscope.reporters.json import load_report

    assert load_report(path).steps[step.step].overflow == overflow


def test_a_watched_loop_without_a_whole_step_replay_names_no_overflow():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # every step overflows
    with gradscope.watch(model, opt, scaler=scaler) as scope:
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(torch.randn(4, 8) * 1e4).float().square().mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert all(s.skipped and s.overflow is None for s in scope.report.steps)


def test_t5_fp16_overflow_is_one_finding_not_also_a_scaler_skip():
    """The skipped steps of a NaN made in the forward belong to that finding (one fault, one finding)."""
    report = gradscope.inspect(lm("t5", args={"overflow": 1e5}, precision="fp16", steps=2))
    assert [a.kind for a in report.anomalies] == ["nonfinite_forward"]
    assert report.anomalies[0].evidence["steps_affected"] == [0, 1]


UNDERFLOW = CONFIGS / "faults" / "fp16_underflow.yaml"
SMALL = {
    "target": "gradscope.faults:ScaledOutput",
    "args": {"scale": 1e-5, "in_features": 32, "hidden": 32, "classes": 10},
}


def test_fp16_without_a_scaler_shows_the_underflow_the_scaler_prevents():
    scaled = gradscope.inspect(load_config(UNDERFLOW, {"model": SMALL}))
    assert not scaled.anomalies and scaled.steps[0].loss_scale == 65536.0
    plain = gradscope.inspect(load_config(UNDERFLOW, {"model": SMALL, "precision": {"dtype": "fp16", "scaler": False}}))
    (finding,) = plain.anomalies
    assert finding.kind == "gradient_underflow" and finding.module == "out"
    assert plain.steps[0].loss_scale is None and not plain.steps[0].skipped
    assert any("without a grad scaler" in note for note in plain.run.notes)


@pytest.mark.parametrize(
    "precision,message",
    [
        ({"dtype": "bf16", "scaler": True}, "scaler: a grad scaler goes with precision fp16, got precision bf16"),
        ({"dtype": "fp16", "scale": 2}, "precision.scale: unknown key; expected one of: dtype, scaler"),
    ],
)
def test_bad_precision_table_is_a_config_error(precision, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(UNDERFLOW, {"precision": precision})
