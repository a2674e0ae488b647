"""Loss and gradient spikes in a real AdamW loop with warm-up: found at their step, with the layers
that jumped; nothing on the same run without them."""

import math
from statistics import median

import pytest
import torch

import gradscope
from gradscope import zoo
from gradscope.checks import SpikeCheck
from gradscope.rules.spikes import spike_against
from tests.conftest import norm64

STEPS, AT = 260, 200


def train(inject: str | None = None, seed: int = 0, nan_at: int | None = None, raise_on: str | None = None):
    """A 4-layer MLP learning a linear teacher: AdamW, 30 warm-up steps, cosine decay, a fresh batch
    each step (the loss drops from ~1.4 to ~0.1 in the first hundred steps). Returns the report and,
    per step, each module's gradient norm taken independently from ``.grad``."""
    torch.manual_seed(seed)
    model = zoo.MLP(in_features=16, hidden=32, depth=3, classes=4)
    teacher = torch.nn.Linear(16, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / STEPS))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    norms = []
    with gradscope.watch(model, optimizer=opt, activations=False, raise_on=raise_on) as scope:
        for step in range(STEPS):
            x = torch.randn(32, 16, generator=gen)
            y = teacher(x).argmax(-1)
            if inject == "batch" and step == AT:
                x = x * 100
            if inject == "lr" and step == AT:
                for group in opt.param_groups:
                    group["lr"] *= 100  # this step's update only: the scheduler sets it back
            if step == nan_at:
                x[3] = math.nan
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            norms.append(module_norms(model))
            scope.step(loss)
            opt.step()
            sched.step()
    return scope.report, norms


def module_norms(model: torch.nn.Module) -> dict[str, float]:
    out = {}
    for name, module in model.named_modules():
        own = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
        if own:
            out[name] = math.sqrt(sum(norm64(g) ** 2 for g in own))
    return out


def jumped_most(norms: list[dict[str, float]], at: int, history: list[int]) -> list[str]:
    """Modules by their norm at ``at`` over their median in the ``history`` steps, largest first."""
    ratios = {name: value / median(norms[i][name] for i in history) for name, value in norms[at].items()}
    return sorted(ratios, key=lambda n: -ratios[n])


def spikes(report):
    return [a for a in report.anomalies if a.kind in ("loss_spike", "gradient_spike")]


@pytest.mark.parametrize("seed", [0, 1])
def test_healthy_run_with_its_early_loss_drop_raises_nothing(seed):
    report, _ = train(seed=seed)
    losses = report.retained.series.loss  # every step, though only some are kept in full
    assert losses[0] > 5 * min(losses[100:])  # the usual early drop happened
    assert report.anomalies == ()


def test_a_batch_scaled_100x_is_a_loss_and_gradient_spike_at_its_step():
    report, norms = train("batch")
    found = {a.kind: a for a in spikes(report)}
    assert set(found) == {"loss_spike", "gradient_spike"}
    for anomaly in found.values():
        assert anomaly.step == AT and anomaly.severity == "warning"
        assert f"step {AT}" in anomaly.message
        assert anomaly.evidence["ratio"] > 10 and anomaly.evidence["sigmas"] > 6
    grad = found["gradient_spike"]
    assert grad.evidence["value"] == pytest.approx(math.sqrt(sum(v * v for v in norms[AT].values())), rel=1e-6)
    history = grad.evidence["layer_history"]
    assert set(range(AT - 8, AT)) <= set(history) and all(AT - 128 <= i < AT for i in history)  # the run-up is kept
    expected = jumped_most(norms, AT, history)
    assert list(grad.evidence["layers"])[:3] == expected[:3]
    assert grad.module == expected[0] and expected[0] in grad.message
    top = expected[0]
    assert grad.evidence["layers"][top] == pytest.approx(norms[AT][top] / median(norms[i][top] for i in history))


def test_a_learning_rate_jump_spikes_the_next_step():
    report, norms = train("lr")
    first = {}
    for anomaly in sorted(spikes(report), key=lambda a: a.step):
        first.setdefault(anomaly.kind, anomaly)
    # The jumped rate moves the weights at step AT's update: step AT + 1 is the first to show it.
    assert {a.step for a in first.values()} == {AT + 1}
    assert all(a.step > AT for a in spikes(report))
    grad = first["gradient_spike"]
    expected = jumped_most(norms, AT + 1, grad.evidence["layer_history"])
    assert list(grad.evidence["layers"])[:3] == expected[:3]


def test_a_nan_after_a_spike_names_it_as_its_cause():
    report, _ = train("batch", nan_at=AT + 3)
    (nan,) = [a for a in report.anomalies if a.kind.startswith("nonfinite")]
    assert nan.step == AT + 3
    assert nan.evidence["cause"]["step"] == AT and f"spike at step {AT}" in nan.message


def test_quiet_before_min_steps_and_on_a_flat_plateau():
    check = SpikeCheck()
    assert spike_against([1.0] * 63, 63, 100.0, check) is None  # still warming up
    assert spike_against([1.0] * 64, 64, 100.0, check) is not None
    # No spread at all: six MADs are zero, but 1.5x the median is no spike.
    assert spike_against([1.0] * 128, 128, 1.5, check) is None
    assert spike_against([1.0, 1.01] * 64, 128, 0.5, check) is None  # a drop is never a spike
    # A memorised batch whose loss went from 1.4 to ~1e-4: a 10x wobble there is below 1% of the early scale.
    assert spike_against([1e-4, 1.1e-4] * 64, 128, 1e-3, check, scale=1.4) is None
    assert spike_against([1e-4, 1.1e-4] * 64, 128, 0.1, check, scale=1.4) is not None


def test_spike_thresholds_are_checks():
    report, _ = train("batch")
    quiet = gradscope.rules.diagnose(report, gradscope.config.Checks.model_validate({"loss_spike": {"factor": 50}}))
    assert "loss_spike" not in {a.kind for a in quiet[0]} and "gradient_spike" in {a.kind for a in quiet[0]}


def test_raise_on_stops_at_a_spike_before_its_update():
    """A spike is judged against the steps before it as it is recorded, so raise_on stops the loop
    there, as OLMo-core's and Megatron's spike checks do, before the optimizer applies the step."""
    with pytest.raises(gradscope.GradientAnomaly) as raised:
        train("batch", raise_on="warning")
    anomaly = raised.value.anomaly
    assert anomaly.kind in ("loss_spike", "gradient_spike") and anomaly.step == AT
    assert anomaly.evidence["value"] > anomaly.evidence["median"] * SpikeCheck().factor


def test_raise_on_lets_a_run_without_spikes_finish():
    report, _ = train(raise_on="warning")
    assert len(report.steps) == STEPS or report.retained is not None
    assert not [a for a in report.anomalies if a.kind.endswith("_spike")]
