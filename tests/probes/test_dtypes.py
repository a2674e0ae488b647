"""float64, complex and mixed-dtype models are measured: each norm against torch's own of each .grad."""

import pytest
import torch
from torch import nn

import gradscope


class Mixed(nn.Module):
    """A float64 layer feeding a float32 one."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8).double()
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x.double())).float())


class Complex(nn.Module):
    """A complex64 weight, then a real head on the moduli."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8, dtype=torch.complex64))
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b((x.to(torch.complex64) @ self.w).abs())


def _measured(model: nn.Module, clip: float | None = None) -> tuple[dict, dict, float]:
    torch.manual_seed(0)
    x, y = torch.randn(6, 8), torch.randint(4, (6,))
    with gradscope.watch(model) as scope:
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        expected = {n: torch.linalg.vector_norm(p.grad).double().item() for n, p in model.named_parameters()}
        maxima = {n: p.grad.abs().max().double().item() for n, p in model.named_parameters()}
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or 1e9).item()
        scope.step(loss)
    step = scope.report.steps[0]
    for name, value in maxima.items():
        assert step.parameters[name].grad_max_abs == pytest.approx(value, rel=1e-6)
    return {n: s.grad_norm for n, s in step.parameters.items()}, expected, total


def _float64() -> nn.Module:
    return nn.Sequential(_Cast(torch.float64), nn.Linear(8, 4).double(), _Cast(torch.float32))


@pytest.mark.parametrize("make", [Mixed, Complex, _float64], ids=["mixed", "complex", "float64"])
def test_float64_and_complex_models_are_measured(make):
    torch.manual_seed(0)
    model = make()
    measured, expected, total = _measured(model)
    assert measured == pytest.approx(expected, rel=1e-6)
    assert sum(v * v for v in measured.values()) ** 0.5 == pytest.approx(total, rel=1e-5)


def test_float64_norm_keeps_float64_precision():
    # A gradient whose norm differs from 1 in the 12th digit: float32 would round it to 1.
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    model = nn.Module()
    model.p = p
    with gradscope.watch(model) as scope:
        loss = (p * torch.tensor([1.0, 1e-6], dtype=torch.float64)).sum()
        loss.backward()
        scope.step(loss)
    assert scope.report.steps[0].parameters["p"].grad_norm == torch.linalg.vector_norm(p.grad).item()


class _Cast(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)
