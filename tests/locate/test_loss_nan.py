"""A NaN/Inf made by the user's own loss code, located inside gradscope.watch: the op and the line
that made it, or the batch's targets when they held it. Counts are checked against the same loss
computed by the test itself."""

import inspect
import math

import pytest
import torch
from torch import nn

import gradscope


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def batches(n: int = 3, nan_target: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x, t = torch.randn(16, 8, generator=gen), torch.randn(16, 2, generator=gen)
        if nan_target:
            t[5, 1] = math.nan
        out.append((x, t))
    return out


def log_of_zero(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    p = out.softmax(-1)
    p = torch.where(torch.arange(len(p))[:, None] == 3, torch.zeros_like(p), p)  # one row's probabilities are 0
    return -torch.log(p[:, 0]).mean()


def zero_norm(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    direction = out - out.detach()  # a zero vector with a gradient
    return (direction / direction.norm(dim=-1, keepdim=True)).sum() + out.square().mean()


def mse(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, t)


def watched(loss_fn, data) -> gradscope.Report:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, quiet=True) as scope:
        for x, t in data:
            opt.zero_grad()
            loss_fn(model(x), t).backward()
            opt.step()
    return scope.report


def line_of(fn, text: str) -> int:
    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if text in line)


def test_a_log_of_zero_in_a_hand_written_loss_is_named_with_its_line():
    report = watched(log_of_zero, batches())
    (a,) = report.at_or_above("error")
    origin = report.steps[0].origin
    model = net()
    x, t = batches()[0]
    with torch.no_grad():  # independent: the same loss, by hand
        p = model(x).softmax(-1)
        p = torch.where(torch.arange(len(p))[:, None] == 3, torch.zeros_like(p), p)
        made = torch.log(p[:, 0])
    assert (origin.phase, origin.op, origin.kind) == ("loss", "torch.log", "inf")
    assert origin.count == int(made.isinf().sum()) == 1 and origin.numel == made.numel()
    assert origin.source.startswith(f"{__file__}:{line_of(log_of_zero, 'torch.log(')} in log_of_zero")
    assert a.kind == "nonfinite_loss" and "torch.log returned Inf" in a.message and "epsilon" in a.message


def test_a_division_by_a_zero_norm_is_named_with_its_line():
    report = watched(zero_norm, batches())
    origin = report.steps[0].origin
    with torch.no_grad():
        v = torch.zeros(16, 2)
        made = v / v.norm(dim=-1, keepdim=True)
    assert (origin.phase, origin.op, origin.kind) == ("loss", "Tensor.div", "nan")
    assert origin.count == int(made.isnan().sum()) == 32
    assert origin.source.startswith(f"{__file__}:{line_of(zero_norm, 'direction / direction')} in zero_norm")
    assert "A division by zero" in report.anomalies[0].message


def test_a_nan_in_the_batchs_targets_is_said_to_be_in_the_batch_not_an_op():
    report = watched(mse, batches(nan_target=True))
    origin = report.steps[0].origin
    assert origin.phase == "input" and origin.op is None and origin.count == 1
    assert "F.mse_loss takes" in origin.tensors[0] and "not the model's output" in origin.tensors[0]
    (a,) = report.at_or_above("error")
    assert "already in the batch" in a.message and "Fix the data" in a.message


def test_a_nan_in_the_models_input_is_still_found_by_the_models_replay():
    data = batches()
    data[0][0][2, 4] = math.nan
    origin = watched(mse, data).steps[0].origin
    assert origin.phase == "input" and origin.samples == (2,)


def test_a_finite_loss_leaves_no_origin_and_no_mode_on_the_stack():
    report = watched(mse, batches())
    assert all(s.origin is None for s in report.steps) and report.at_or_above("warning") == []
    assert torch._C._len_torch_function_stack() == 0


def test_the_mode_is_off_once_backward_is_called_so_the_users_clipping_does_not_go_through_it():
    model, (x, t) = net(), batches(1)[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    backward = torch.Tensor.backward
    with gradscope.watch(model, opt, quiet=True) as scope:
        for _ in range(2):
            opt.zero_grad()
            loss = mse(model(x), t)
            assert torch._C._len_torch_function_stack() == 1  # the loss code is watched
            loss.backward()
            assert torch._C._len_torch_function_stack() == 0  # off before the user's code after backward
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    assert torch.Tensor.backward is backward  # the patch comes off with the watch
    expected = mse(model(x), t)  # the loss is still recorded and a NaN still located (tests above)
    assert scope.report.steps[-1].loss is not None and math.isfinite(expected.item())


def test_the_mode_comes_off_when_the_loss_code_raises():
    model = net()
    with pytest.raises(ValueError), gradscope.watch(model, quiet=True):
        out = model(torch.randn(4, 8))
        assert torch._C._len_torch_function_stack() == 1  # the loss code is watched
        raise ValueError(out.shape)
    assert torch._C._len_torch_function_stack() == 0
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_views_of_the_models_output_and_targets_are_not_counted_again():
    # nanoGPT's loss shape: the loss takes views (flatten, view, detach) that hold the model's output or
    # the targets unchanged; what is counted is the targets once and the loss the op made.
    model, (x, t) = net(), batches(1)[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, quiet=True) as scope:
        out = model(x)
        loss = nn.functional.mse_loss(out.flatten(), t.view(-1)) + 0 * out.detach().sum()
        counted = [(e.op, e.given, e.numel) for e in scope.loss_ops._entries]
        loss.backward()
        opt.step()
    made = [("F.mse_loss", None, 1), ("Tensor.sum", None, 1), ("Tensor.mul", None, 1), ("Tensor.add", None, 1)]
    assert counted == [(None, "input", t.numel()), *made]


def test_an_inf_made_by_reading_integers_as_floats_is_named():
    # A view as another dtype makes new values: it is counted, and named when it makes an Inf.
    def bits_as_floats(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        bits = torch.full_like(t, 0x7F800000, dtype=torch.int32)  # the float32 pattern of +Inf
        return nn.functional.mse_loss(out, t) + (bits.view(torch.float32) * 0).sum()

    origin = watched(bits_as_floats, batches()).steps[0].origin
    assert (origin.phase, origin.op, origin.kind, origin.count) == ("loss", "Tensor.view", "inf", 32)
