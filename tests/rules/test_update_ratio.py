"""The update-ratio probe: |delta w| / |w| of each parameter, against the weights copied by hand."""

import json
import math
import statistics

import pytest
import torch

import gradscope
import gradscope.config
from gradscope.report import Report
from tests.probes.test_syncs import count_syncs


def train(model, steps, **watch_args):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = []  # the weights each step is measured at (before its update)
    x, y = torch.randn(16, 6), torch.randint(3, (16,))
    with gradscope.watch(model, optimizer, probes=("update_ratio",), **watch_args) as scope:
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            before.append({n: p.detach().clone() for n, p in model.named_parameters()})
            optimizer.step()
    return scope, before


def test_update_ratio_is_each_weights_change_over_its_norm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    scope, before = train(model, 3)
    steps = scope.report.steps
    assert "update_ratio" not in steps[0].probes  # nothing to compare the first step with
    for n in (1, 2):
        ratios = steps[n].probes["update_ratio"]
        assert set(ratios) == {name for name, _ in model.named_parameters()}
        for name, ratio in ratios.items():
            old, new = before[n - 1][name].double(), before[n][name].double()
            expected = torch.linalg.vector_norm(new - old) / torch.linalg.vector_norm(old)
            assert ratio == pytest.approx(expected.item(), rel=1e-5)
            assert 0 < ratio < 1


def test_update_ratio_joins_the_steps_one_host_transfer(monkeypatch):
    calls = count_syncs(monkeypatch)
    model = torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(10)], torch.nn.Linear(6, 3))
    train(model, 3, activations=False)
    assert calls == ["tolist"] * 3


def test_update_ratio_survives_the_json_report():
    model = torch.nn.Sequential(torch.nn.Linear(6, 3))
    scope, _ = train(model, 2)
    again = Report.from_dict(scope.report.to_dict())
    assert again.steps[1].probes == scope.report.steps[1].probes
    assert all(math.isfinite(r) for r in again.steps[1].probes["update_ratio"].values())


def test_an_unknown_probe_is_named_with_those_there_are():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="update_ratio"):
        gradscope.watch(model, probes=("update_ratios",))


def adamw_run(model, lr, steps=16):
    """A loop on fresh batches with the probe on; each step's weights copied by hand, before its update."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    weights = []
    with gradscope.watch(model, opt, probes=("update_ratio",)) as scope:
        for step in range(steps):
            x = torch.randn(32, 16, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), x[:, :4].argmax(1)).backward()
            weights.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
            opt.step()
    return scope.report, weights


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def test_a_learning_rate_that_rewrites_the_weights_each_step_is_a_warning():
    report, weights = adamw_run(mlp(), lr=0.3)
    (finding,) = [a for a in report.anomalies if a.kind == "update_ratio"]
    assert finding.severity == "warning" and finding.parameter in ("0.weight", "2.weight")
    # The median it states is that of |delta w| / |w| taken by hand, over the steps after the warm-up.
    name = finding.parameter
    by_hand = [
        (torch.linalg.vector_norm(after[name] - before[name]) / torch.linalg.vector_norm(before[name])).item()
        for before, after in zip(weights, weights[1:])
    ]
    judged = sorted(by_hand[gradscope.config.Checks().update_ratio.skip :])
    assert finding.evidence["median_ratio"] == pytest.approx(statistics.median(judged), rel=1e-5)
    assert "lr 0.3" in finding.message and "0.bias" not in finding.evidence["parameters"]


def test_a_healthy_learning_rate_moves_the_weights_little_and_is_not_judged():
    report, _ = adamw_run(mlp(), lr=1e-3)
    assert not [a for a in report.anomalies if a.kind == "update_ratio"]
    ratios = [r for s in report.steps[1:] for n, r in s.probes["update_ratio"].items() if n.endswith("weight")]
    assert max(ratios) < 0.1


def test_a_lora_fine_tune_is_not_judged_by_its_zero_started_weights():
    """LoRA's B starts at zero: its first ratio is infinite and then falls as 1/steps, which says
    nothing of the learning rate; the real fine-tune's other weights stay below the threshold."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=32)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(config), lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    with gradscope.watch(model, opt, probes=("update_ratio",)) as scope:
        for step in range(14):
            ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    report = scope.report
    assert report.at_or_above("warning") == [], [(a.kind, a.message) for a in report.anomalies]
    b = next(n for n in report.steps[1].probes["update_ratio"] if "lora_B" in n)
    assert report.steps[1].probes["update_ratio"][b] == math.inf


def test_the_config_turns_the_probe_on_and_names_a_probe_it_does_not_know(tmp_path):
    from typer.testing import CliRunner

    from gradscope.cli import app
    from tests.conftest import ROOT

    config = (ROOT / "configs" / "residual_mlp.yaml").read_text()
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(config + "probes: [update_ratio]\n")
    bad.write_text(config + "probes:\n  - update_ratio\n  - update_ratios\n")
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["inspect", str(good), "--json", str(out)])
    assert result.exit_code in (0, 1), result.output
    steps = Report.from_dict(json.loads(out.read_text())).steps
    assert set(steps[1].probes["update_ratio"]) >= {"out.weight", "blocks.0.linear.weight"}
    result = CliRunner().invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:{config.count(chr(10)) + 3}: probes[1]" in result.output
    assert "expected one of: memory, update_ratio, got 'update_ratios'" in result.output
