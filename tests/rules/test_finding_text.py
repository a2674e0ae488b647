"""Findings read as sentences: no ``None`` cells, no raw floats, lists cut with an ellipsis."""

import torch

import gradscope
from gradscope import faults
from gradscope.report import GradcheckResult, Report, RunInfo
from gradscope.rules.broken import wrong_gradient
from tests.conftest import config


def test_nan_made_after_the_model_in_a_user_loop_names_no_none():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(8, 8)
    with gradscope.watch(model) as scope:
        loss = torch.sqrt(model(x).sum() - 1e6)  # NaN made in the loss, after the model
        loss.backward()
        scope.step(loss)
    (finding,) = [a for a in scope.report.anomalies if a.kind == "nonfinite_loss"]
    assert "None" not in finding.message and "0 values" not in finding.message
    assert "after the model" in finding.message


def test_a_nan_made_only_in_the_losss_backward_says_so_with_the_finite_loss():
    """The loss's value is finite (0) and its gradient is NaN: sqrt at 0 in the loss code. The watch's forward
    count of the loss ops sees no non-finite value, so the finding must say the loss's backward made it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 8)
    with gradscope.watch(model, opt) as scope:
        opt.zero_grad()
        out = model(x)
        (out - out.detach()).pow(2).sum().sqrt().backward()  # a bug: the norm of a difference that is 0
        opt.step()
    (finding,) = [a for a in scope.report.anomalies if a.kind == "nonfinite_loss"]
    assert scope.report.steps[0].loss == 0.0
    assert "first appears in the loss's backward" in finding.message and "is finite (0)" in finding.message
    assert "sqrt or pow(x, p<1) at 0" in finding.message and "this op" not in finding.message


def test_scaler_that_skips_every_step_is_an_error():
    """Gradients that overflow fp16 even unscaled: the scale collapses below 1 and nothing trains."""
    torch.manual_seed(0)
    model = faults.ScaledOutput(scale=1000.0, in_features=16, hidden=32, depth=2, classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
    with gradscope.watch(model, optimizer=opt, scaler=scaler) as scope:
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(model(x), y) * 1e4  # a loss weight that large
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    (finding,) = scope.report.anomalies
    assert finding.kind == "loss_scale_overflow" and finding.severity == "error"
    assert "does not train" in finding.message


def test_clipping_message_says_how_many_norms_it_left_out():
    raw = config(steps=7, optimizer={"name": "sgd", "lr": 0.01}, clip={"max_norm": 1e-4})
    (finding,) = [a for a in gradscope.inspect(raw).anomalies if a.kind == "gradient_clipping"]
    assert "... (7 in all)" in finding.message
    shown = finding.message.split("pre-clip norms ")[1].split(", ...")[0].split(", ")
    assert len(shown) == 5


def test_wrong_gradient_rounds_gradchecks_floats():
    detail = "Jacobian mismatch for output 0 with respect to input 0, numerical:0.9177537358081188 analytical:0.611835823989624"
    report = Report(
        RunInfo("M", "cpu", "fp32", 1, 1, 1, 1), (), (), gradchecks=(GradcheckResult("Cube", "f.py:3", False, detail),)
    )
    (finding,) = wrong_gradient(report, None)
    assert "numerical 0.9178 analytical 0.6118" in finding.message
    assert "0.9177537" not in finding.message
