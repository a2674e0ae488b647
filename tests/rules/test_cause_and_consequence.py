"""Severities that match the harm, and findings that tell a cause from its consequences."""

import json

import pytest
import torch
from typer.testing import CliRunner

import gradscope
from gradscope.cli import app
from gradscope.tables import grad_to_param
from tests.conftest import CONFIGS, TESTS, config

runner = CliRunner()


def test_a_network_with_no_gradient_upstream_of_its_head_fails_ci_by_default(tmp_path):
    """configs/faults/dead_relu.yaml: every weight gradient is 0, only out.bias moves; it ended exit 0."""
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["inspect", str(CONFIGS / "faults" / "dead_relu.yaml"), "--json", str(out)])
    assert result.exit_code == 1, result.output
    dead = [a for a in json.loads(out.read_text())["anomalies"] if a["kind"] == "dead_relu"]
    assert dead and all(a["severity"] == "error" for a in dead)
    assert dead[0]["evidence"]["starved"]["head"] == "out" and dead[0]["evidence"]["starved"]["with_gradient"] == 0
    assert "Nothing upstream of out learns" in dead[0]["message"]


def test_a_dead_relu_that_leaves_other_paths_learning_stays_a_warning():
    """Half the units of one layer dead, the residual path carrying gradient: not the whole network starved."""
    torch.manual_seed(0)

    class Residual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.hidden, self.out = torch.nn.Linear(16, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 4)
            torch.nn.init.constant_(self.hidden.bias, -50.0)  # every unit of this ReLU dead

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.inp(x))
            return self.out(h + torch.relu(self.hidden(h)))

    model = Residual()
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    with gradscope.watch(model) as scope:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        scope.step()
    dead = [a for a in scope.report.anomalies if a.kind == "dead_relu"]
    assert dead and all(a.severity == "warning" for a in dead)
    assert "Nothing upstream" not in dead[0].message


EXAMPLES = TESTS / "examples_models.py"


def word_lm_config(tmp_path, **changes) -> str:
    """pytorch/examples' word_language_model recipe: LSTM LM, SGD at lr 20, gradients clipped to 0.25."""
    import yaml

    raw = {
        "seed": 1111,
        "model": {"target": f"{EXAMPLES}:WordLM", "args": {"ntoken": 2000}},
        "data": {"target": f"{EXAMPLES}:word_lm_batch", "args": {"batch": 20, "bptt": 35, "vocab": 2000}},
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 20},
        "clip": {"max_norm": 0.25},
        "steps": 8,
        **changes,
    }
    path = tmp_path / "word_lm.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_the_word_language_model_recipe_is_not_an_exploding_gradient(tmp_path):
    """SGD at lr 20 with clip_grad_norm_ 0.25 got ERROR "one step changes it by about 1.25x its own
    norm": lr x |grad|/|weight| before clipping. The clipped update is what moves the weights."""
    report = gradscope.inspect(word_lm_config(tmp_path))
    clipped = [s for s in report.steps if s.clip_coefficient is not None and s.clip_coefficient < 1]
    assert clipped  # the recipe's clipping did act
    big = max(clipped, key=lambda s: s.grad_norm_total)
    unclipped = 20 * max(r for _, r in grad_to_param(big.parameters, ["decoder.weight"]))
    assert unclipped > 1  # what the old rule judged: above its threshold
    assert not [a for a in report.anomalies if a.kind == "exploding_gradient" and a.severity != "info"]
    assert not report.at_or_above("error")


def test_the_word_language_model_loop_of_pytorch_examples_stays_quiet():
    """main.py's own loop: hidden state carried and detached, clip_grad_norm_(0.25), SGD at lr 20."""
    from tests.examples_models import RNNModel, markov_tokens

    torch.manual_seed(1111)
    ntoken, bsz, bptt = 2000, 20, 35
    data = markov_tokens(ntoken, bsz * 12 * bptt).view(bsz, -1).t().contiguous()  # batchify: (time, batch)
    model = RNNModel(ntoken)
    opt = torch.optim.SGD(model.parameters(), lr=20)
    hidden = model.init_hidden(bsz)
    with gradscope.watch(model, opt) as scope:
        for i in range(0, 10 * bptt, bptt):
            x, y = data[i : i + bptt], data[i + 1 : i + 1 + bptt].reshape(-1)
            hidden = tuple(h.detach() for h in hidden)
            opt.zero_grad()
            output, hidden = model(x, hidden)
            loss = torch.nn.functional.nll_loss(output, y)
            loss.backward()
            scope.step(loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step()
    assert not scope.report.at_or_above("warning"), [a.message for a in scope.report.anomalies]


def test_an_efficientnet_trained_with_sgd_is_at_most_an_info_while_its_loss_falls(tmp_path):
    """BatchNorm after each conv makes a depthwise kernel's scale irrelevant: |grad|/|weight| 112 at lr
    0.1 was an ERROR, though the loss fell from 2.24 to about 1.6."""
    from tests.rules.test_corpus import corpus_report

    report = corpus_report(
        "efficientnet", optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-5}, steps=6
    )
    (finding,) = [a for a in report.anomalies if a.kind == "exploding_gradient"]
    assert finding.severity == "info"
    assert "the loss fell from" in finding.message and "x its own norm" in finding.message
    assert finding.evidence["update_ratio"] > 1 and finding.evidence["aftermath"]["harm"] is None
    assert not report.at_or_above("warning")


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _dying_run(big_lr: float) -> gradscope.Report:
    """Regression at lr 0.01, with one step at ``big_lr`` (step 2): a schedule's spike."""
    torch.manual_seed(0)
    net = _Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(256, 20) + 1.0
    y = x.sum(1, keepdim=True)
    with gradscope.watch(net, opt, probes=["update_ratio"]) as scope:
        for i in range(6):
            for group in opt.param_groups:
                group["lr"] = big_lr if i == 2 else 0.01
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward()
            scope.step(loss)
            opt.step()
    return scope.report


def test_relus_that_die_after_a_too_large_update_are_reported_with_the_update():
    """The update was reported (exploding_gradient) and the dead units not at all: they were alive
    at the first steps, and the rule judged the smallest dead fraction of the run."""
    report = _dying_run(0.1)
    fractions = [next(iter(s.activations.values())).fraction for s in report.steps]
    assert fractions[:3] == [0.0, 0.0, 0.0] and min(fractions[3:]) > 0.5  # independent of the rules
    (dead,) = [a for a in report.anomalies if a.kind == "dead_relu"]
    assert dead.step == 3 and dead.evidence["died_at"] == 3 and dead.module == "layers.1"
    moved = report.steps[3].probes["update_ratio"]["layers.0.weight"]  # the probe's reading of step 2's update
    assert "units of layers.1 died at step 3" in dead.message.lower()
    assert f"after the step-2 update moved layers.0.weight by {moved:.3g}x its norm" in dead.message
    (boom,) = [a for a in report.anomalies if a.kind == "exploding_gradient"]
    assert boom.step == 2 and boom.severity == "error" and "units of layers.1 died" in boom.message


def test_a_large_update_the_run_never_saw_the_consequences_of_is_a_warning():
    raw = config(optimizer={"name": "sgd", "lr": 1000.0})
    report = gradscope.inspect(raw)
    (boom,) = [a for a in report.anomalies if a.kind == "exploding_gradient"]
    assert boom.severity == "warning" and "ended before a later step" in boom.message


def _nan_then_raise(tmp_path, model: str, loss: str | None, classes: int, width: int) -> tuple:
    import yaml

    raw = {
        "model": {"target": f"{EXAMPLES}:{model}"},
        "data": {"batch_size": 16, "input": {"shape": [width]}, "labels": {"classes": classes}},
        "optimizer": {"name": "sgd", "lr": 0.01},
        "steps": 3,
        **({"loss": {"target": f"{EXAMPLES}:{loss}"}} if loss else {}),
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["inspect", str(path), "--json", str(out)])
    return result, json.loads(out.read_text())


@pytest.mark.parametrize(
    ("model", "loss", "classes", "width", "raised"),
    [
        ("Policy", "reinforce_loss", 4, 32, "Categorical"),  # torch.distributions refuses NaN probabilities
        ("Whitened", None, 10, 16, "linalg.eigh"),  # eigh cannot converge on a NaN matrix
    ],
)
def test_a_raise_on_the_nan_an_earlier_step_wrote_is_that_findings_consequence(
    tmp_path, model, loss, classes, width, raised
):
    """Step 0 writes NaN into the weights, step 1 raises on them: the run ended "run failed ... exit 2"
    with step 1's error as the headline, although step 0's finding is the cause."""
    result, report = _nan_then_raise(tmp_path, model, loss, classes, width)
    assert report["run"]["status"] == "failed" and report["run"]["steps_completed"] == 1
    assert raised in report["run"]["error"]
    assert report["run"]["nonfinite_parameters"]
    first = report["anomalies"][0]
    assert first["kind"].startswith("nonfinite") and first["step"] == 0 and first["severity"] == "error"
    assert first["evidence"]["consequence"]["step"] == 1
    assert "step 1 then raised" in first["message"] and "consequence" in first["message"]
    assert result.exit_code == 1, result.output
    (verdict,) = [line for line in result.stdout.splitlines() if line.endswith("; exit 1")]
    assert verdict.startswith("1 error: nonfinite") and "then step 1 raised, its consequence" in verdict
    assert verdict.endswith("exit 1") and "run failed" not in verdict


def test_a_raise_with_finite_weights_is_still_the_users_code_failing(tmp_path):
    """A model that raises at step 1 on its own (no NaN in its weights) stays exit 2."""
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"target": f"{TESTS / 'examples_models.py'}:RaisesAtSecondCall"},
                "data": {"batch_size": 8, "input": {"shape": [8]}, "labels": {"classes": 4}},
                "steps": 3,
            }
        )
    )
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2, result.output
    (verdict,) = [line for line in result.stdout.splitlines() if line.endswith("; exit 2")]
    assert verdict.startswith("run failed after 1 of 3 steps")
