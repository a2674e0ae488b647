"""Dead units, firing density and saturation as gradscope reports them, against the same numbers
computed from the model's activations captured with plain forward hooks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.probes.activations import ActivationProbe
from gradscope.probes.modules import ModuleTracker


class Relu(nn.Module):
    """``F.relu`` inside a module of its own, so a forward hook sees the output of a function call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class ClampAtZero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=0)


class Net(nn.Module):
    """A conv map (units are channels), a (B, T, F) sequence and a flat layer, with some units held
    dead by a large negative bias and some always firing; activation modules or function calls."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.seq = nn.Linear(6, 10)
        self.fc = nn.Linear(10 * 4, 12)
        self.gate = nn.Linear(12, 5)
        self.squash = nn.Linear(12, 5)
        self.head = nn.Linear(10, 3)
        self.act1 = Relu() if functional else nn.ReLU()
        self.act2 = ClampAtZero() if functional else nn.ReLU6()
        self.act3 = Relu() if functional else nn.ReLU()
        self.sig, self.tanh = nn.Sigmoid(), nn.Tanh()
        with torch.no_grad():
            self.conv.bias[:2] = -100.0  # channels 0 and 1 never fire
            self.seq.bias[3] = 100.0  # always fires
            self.fc.bias[:4] = -100.0
            self.gate.weight.mul_(40.0)  # saturates many of the sigmoid's values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.conv(x))  # (B, 6, 4, 4)
        h = self.act2(self.seq(h.flatten(2).transpose(1, 2)))  # (B, 16, 10)
        h = self.act3(self.fc(h[:, :4].flatten(1)))  # (B, 12)
        return self.head(torch.cat([self.sig(self.gate(h)), self.tanh(self.squash(h))], dim=1))


def expected(kind: str, out: torch.Tensor) -> tuple[int, float, float | None]:
    """(units, fraction, density) straight from an activation's output."""
    unit_dim = 1 if out.ndim == 4 else out.ndim - 1
    samples = [d for d in range(out.ndim) if d != unit_dim]
    if kind == "relu":
        dead = (out.amax(dim=samples) <= 0).sum().item()
        return out.shape[unit_dim], dead / out.shape[unit_dim], (out > 0).sum().item() / out.numel()
    if kind == "sigmoid":
        saturated = ((out < 0.01) | (out > 0.99)).sum().item()
    else:
        saturated = (out.abs() > 0.99).sum().item()
    return out.shape[unit_dim], saturated / out.numel(), None


KINDS = {"act1": "relu", "act2": "relu", "act3": "relu", "sig": "sigmoid", "tanh": "tanh"}


@pytest.mark.parametrize("functional", [False, True], ids=["module_hooks", "function_mode"])
def test_readings_match_the_captured_activations(functional):
    torch.manual_seed(0)
    model = Net(functional)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    captured: list[dict[str, torch.Tensor]] = []

    def keep(name):
        return lambda module, args, out: captured[-1].__setitem__(name, out.detach().clone())

    handles = [getattr(model, name).register_forward_hook(keep(name)) for name in KINDS]
    with gradscope.watch(model, optimizer, locate=False) as scope:
        for _ in range(3):  # from the second step, the module hooks replace the mode where they can
            captured.append({})
            optimizer.zero_grad()
            F.cross_entropy(model(torch.randn(8, 3, 4, 4)), torch.randint(3, (8,))).backward()
            optimizer.step()
    for handle in handles:
        handle.remove()
    for step, outputs in zip(scope.report.steps, captured, strict=True):
        by_module = {a.module: a for a in step.activations.values()}
        assert set(by_module) == set(KINDS)
        for name, kind in KINDS.items():
            units, fraction, density = expected(kind, outputs[name])
            stats = by_module[name]
            assert (stats.kind, stats.units, stats.fraction, stats.density) == (kind, units, fraction, density)
    fractions = {a.module: a.fraction for a in scope.report.steps[0].activations.values()}
    assert fractions["act1"] >= 2 / 6 and fractions["act3"] >= 4 / 12 and fractions["sig"] > 0.1


def readings(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[float, float | None]]:
    """The probe's (fraction, density) of each site of one forward pass of ``model``."""
    tracker = ModuleTracker(model)
    probe = ActivationProbe(tracker)
    with tracker, probe:
        model(x)
    values = torch.cat(probe.values()).tolist()
    return {a.module: (a.fraction, a.density) for a in probe.results(values).values()}


class Plant(nn.Module):
    """ReLUs over a fixed tensor: the input itself is the pre-activation."""

    def __init__(self, high: float | None = None) -> None:
        super().__init__()
        self.act, self.high = nn.ReLU(), high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) if self.high is None else x.clamp(min=0, max=self.high)


def test_nan_inf_and_signed_zero_count_as_a_direct_computation_does():
    nan, inf = float("nan"), float("inf")
    # units (columns): NaN with a positive value; NaN with zeros; only NaN; inf; -0.0 and 0; zeros
    x = torch.tensor(
        [[nan, nan, nan, inf, -0.0, 0.0], [2.0, 0.0, nan, 0.0, 0.0, 0.0], [0.0, -1.0, nan, -inf, 0.0, 0.0]]
    )
    out = torch.relu(x)
    units, fraction, density = expected("relu", out)
    assert readings(Plant(), x)["act"] == (fraction, density) == (2 / 6, 2 / 18)


def test_clamp_below_a_negative_bound_is_all_dead():
    x = torch.randn(4, 5)
    out = x.clamp(min=0, max=-1.0)  # every value is -1: a max <= 0, nothing above 0
    units, fraction, density = expected("relu", out)
    assert readings(Plant(high=-1.0), x)["(model)"] == (fraction, density) == (1.0, 0.0)


def test_a_step_with_fewer_tanh_calls_than_the_last_is_counted_not_an_index_error():
    """An accumulation cut short at the end of an epoch calls each tanh fewer times in its step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 8, 4) * 3
    seen: list[torch.Tensor] = []  # independent: the tanh outputs, by a plain forward hook
    hook = model[1].register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with gradscope.watch(model, opt, quiet=True) as scope:
        for i in range(5):  # steps of 3 micro-batches, then of 2
            model(x[i]).pow(2).mean().backward()
            if i in (2, 4):
                opt.step()
                opt.zero_grad()
    hook.remove()
    first, last = scope.report.steps
    assert (len(first.activations), len(last.activations)) == (3, 2)
    want = [(out.abs() > 0.99).float().mean().item() for out in seen[3:]]
    assert [a.fraction for a in last.activations.values()] == pytest.approx(want)
