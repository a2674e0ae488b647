"""gradscope.watch under the step shapes trainers use: optimizer.step(closure), accelerate's
wrappers, autocast switched on inside the model's forward, a bf16 model, on_step."""

import pytest
import torch
from torch import nn

import gradscope
from tests.conftest import norm64
from tests.trainer_setup import fresh_accelerate  # noqa: F401 (a fixture)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=gen), torch.randn(n, 1, generator=gen)


def test_closure_step_is_recorded_after_its_backward_not_before():
    """optimizer.step(closure) runs forward and backward inside step: the record of step i holds
    step i's gradients (the step pre-hook alone saw step i-1's, and zeros first)."""
    model, (x, y) = tiny(), data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected, losses = [], []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        expected.append({n: norm64(p.grad) for n, p in model.named_parameters()})
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)  # as Lightning clips inside the closure
        losses.append(loss.item())
        return loss

    with gradscope.watch(model, opt) as scope:
        for _ in range(3):
            opt.step(closure)
    steps = scope.report.steps
    assert len(steps) == 3
    for step, norms, loss in zip(steps, expected, losses):
        assert step.loss == pytest.approx(loss)
        for name, value in norms.items():
            assert step.parameters[name].grad_norm == pytest.approx(value, rel=1e-6)
        total = sum(v**2 for v in norms.values()) ** 0.5
        assert step.clip_coefficient == pytest.approx(0.05 / total, rel=1e-5)


def test_lbfgs_records_one_step_per_optimizer_step_from_its_first_closure_call():
    model, (x, y) = tiny(), data()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    first = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        first.append(norm64(torch.cat([p.grad.flatten() for p in model.parameters()])))
        return loss

    with gradscope.watch(model, opt) as scope:
        calls = []
        for _ in range(2):
            before = len(first)
            opt.step(closure)
            calls.append(before)
    steps = scope.report.steps
    assert len(steps) == 2 and len(first) > 2  # LBFGS called the closure more than once a step
    for step, at in zip(steps, calls):
        assert step.grad_norm_total == pytest.approx(first[at], rel=1e-6)


@pytest.mark.usefixtures("fresh_accelerate")
def test_accelerated_optimizer_is_unwrapped():
    from accelerate import Accelerator

    model, (x, y) = tiny(), data()
    accelerator = Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    expected = []
    with gradscope.watch(model, opt) as scope:
        for _ in range(2):
            opt.zero_grad()
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            expected.append(norm64(torch.cat([p.grad.flatten() for p in model.parameters()])))
            opt.step()
    assert [s.grad_norm_total for s in scope.report.steps] == pytest.approx(expected, rel=1e-6)
    assert not opt.optimizer._optimizer_step_pre_hooks  # hooks came off the optimizer inside


@pytest.mark.usefixtures("fresh_accelerate")
def test_precision_is_the_autocast_seen_inside_the_forward():
    """accelerate switches autocast on inside the model's forward, after the model's own call began."""
    from accelerate import Accelerator

    model, (x, y) = tiny(), data()
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with gradscope.watch(model, opt) as scope:
        opt.zero_grad()
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        opt.step()
    assert scope.report.run.precision == "bf16"
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_precision_of_a_bf16_model_and_of_a_plain_one():
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        model, (x, y) = tiny().to(dtype), data()
        with gradscope.watch(model) as scope:
            loss = nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))
            loss.backward()
            scope.step(loss)
        assert scope.report.run.precision == name


def test_on_step_is_called_with_each_record():
    model, (x, y) = tiny(), data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    with gradscope.watch(model, opt, on_step=seen.append) as scope:
        for _ in range(2):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert seen == list(scope.report.steps)
