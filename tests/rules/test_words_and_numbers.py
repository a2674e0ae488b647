"""Findings and columns say what was measured: no "fell from 65536 to 65536", no fixed "under 0.1"
for a mild clip, no alarming grad/param ratio for a weight that is (still) about zero."""

import io

import pytest
import torch

import gradscope
from gradscope.config import load_config
from gradscope.reporters.terminal import TerminalReporter
from tests.conftest import CONFIGS


def test_a_single_calibration_skip_does_not_say_the_scale_fell_to_itself():
    report = gradscope.inspect(load_config(CONFIGS / "faults" / "fp16_overflow.yaml", {"steps": 1}))
    (finding,) = [a for a in report.anomalies if a.kind == "loss_scale_overflow"]
    assert "from 65536 to 65536" not in finding.message
    assert "at loss scale 65536" in finding.message


def test_several_calibration_skips_say_how_far_the_scale_fell():
    report = gradscope.inspect(load_config(CONFIGS / "faults" / "fp16_overflow.yaml", {"steps": 3}))
    (finding,) = [a for a in report.anomalies if a.kind == "loss_scale_overflow"]
    assert "fell from 65536 to 16384" in finding.message


def _clipped_run(fraction: float) -> gradscope.Report:
    """A real loop that clips every step at ``fraction`` of the gradient norm the first step measures."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    max_norm = None
    with gradscope.watch(model, opt) as scope:
        for _ in range(6):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if max_norm is None:
                max_norm = fraction * float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
    return scope.report


def test_clipping_message_says_the_measured_coefficient_when_it_is_mild():
    """At coefficients of 0.74-0.96 the finding said "by a factor under 0.1 it hides how large the gradients are"."""
    (finding,) = [a for a in _clipped_run(0.85).anomalies if a.kind == "gradient_clipping"]
    assert all(0.7 < c < 1 for c in finding.evidence["coefficients"])
    assert "under 0.1" not in finding.message and "hides" not in finding.message
    said = float(finding.message.split("median coefficient ")[1].split(" ")[0])
    assert min(finding.evidence["coefficients"]) <= said <= max(finding.evidence["coefficients"])
    assert finding.severity == "info"


def test_clipping_message_says_the_gradients_are_hidden_when_the_cut_is_strong():
    (finding,) = [a for a in _clipped_run(0.02).anomalies if a.kind == "gradient_clipping"]
    assert finding.severity == "warning"
    assert "under 0.1" in finding.message and "hides how large the gradients are" in finding.message


def test_grad_to_param_of_a_zero_initialised_bias_is_shown_as_not_meaningful():
    """configs/transformer_lm.yaml showed 110 in the grad/param column for ``blocks.0.attn.proj.bias``
    (zeros at init, two AdamW steps of 3e-4 later): the ratio measured the bias's smallness."""
    report = gradscope.inspect(load_config(CONFIGS / "transformer_lm.yaml"))
    last = report.steps[-1]
    bias = last.parameters["blocks.0.attn.proj.bias"]
    assert bias.grad_to_param > 50  # what the column showed
    stream = io.StringIO()
    TerminalReporter(stream, show_all=True).write(report)
    rows = {line.split()[0]: line for line in stream.getvalue().splitlines() if line.strip()}
    assert "|w|~0" in rows["blocks.0.attn.proj.bias"]
    assert f"{bias.grad_to_param:.4g}" not in rows["blocks.0.attn.proj.bias"]
    weight = last.parameters["blocks.0.attn.proj.weight"]  # default-initialised: its ratio stays
    assert f"{weight.grad_to_param:.4g}" in rows["blocks.0.attn.proj.weight"]
    assert "|w|~0" not in rows["blocks.0.attn.proj.weight"]


def _junit(tmp_path, *args: str) -> dict:
    import xml.etree.ElementTree as ET

    from typer.testing import CliRunner

    from gradscope.cli import app

    out = tmp_path / "junit.xml"
    result = CliRunner().invoke(app, ["inspect", str(CONFIGS / "residual_mlp.yaml"), *args, "--junit", str(out)])
    assert result.exit_code in (0, 1), result.output
    return {c.get("name"): c for c in ET.parse(out).getroot().iter("testcase")}


def test_junit_skips_the_spike_checks_of_a_run_too_short_for_them(tmp_path):
    """A 2-step run marked loss_spike and gradient_spike as passed, though they judge no step before 64."""
    cases = _junit(tmp_path, "--steps", "2")
    for kind in ("loss_spike", "gradient_spike"):
        skipped = cases[kind].find("skipped")
        assert skipped is not None, kind
        assert "64" in skipped.get("message") and "made 2" in skipped.get("message")


def test_junit_runs_the_spike_checks_once_the_run_has_their_steps(tmp_path):
    cases = _junit(
        tmp_path, "--steps", "6", "--check", "loss_spike.min_steps=4", "--check", "gradient_spike.min_steps=4"
    )
    assert cases["loss_spike"].find("skipped") is None and cases["gradient_spike"].find("skipped") is None


def test_json_histograms_store_their_edges_and_redraw_the_gradient(tmp_path):
    """The JSON held bucket counts without edges: a reader could not redraw them."""
    import json

    from gradscope.reporters.json import load_report

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    path = tmp_path / "report.json"
    with gradscope.watch(model, opt, logdir=str(tmp_path / "tb"), histograms_every=1, json=str(path)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.detach().clone().double().flatten() for n, p in model.named_parameters()}
        opt.step()
    data = json.loads(path.read_text())
    histograms = data["steps"][0]["histograms"]
    assert set(histograms) == set(grads)
    for name, h in histograms.items():
        edges = h["edges"]
        assert len(edges) == len(h["buckets"]) + 1 and edges[0] == h["min"] and edges[-1] == h["max"]
        redrawn = torch.histogram(grads[name], bins=torch.tensor(edges, dtype=torch.float64)).hist.long().tolist()
        assert sum(redrawn) == sum(h["buckets"]) == grads[name].numel()
        assert sum(abs(a - b) for a, b in zip(redrawn, h["buckets"])) <= 2  # a value on an edge may round either way
    written = {name: h.pop("edges") for name, h in histograms.items()}  # a report from before the edges
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    read = load_report(old).steps[0].histograms["0.weight"]
    assert read.bucket_edges() == pytest.approx(written["0.weight"], rel=1e-12, abs=1e-15)


def test_a_misspelled_transformers_target_suggests_the_close_name():
    from gradscope.config import settings_from_dict
    from gradscope.errors import ConfigError
    from gradscope.loading import build_model
    from tests.conftest import config

    raw = config("transformers:LLamaForCausalLM", {"config": {"target": "transformers:LlamaConfig", "args": {}}})
    with pytest.raises(ConfigError) as caught:
        build_model(settings_from_dict(raw))
    assert "did you mean 'LlamaForCausalLM'" in str(caught.value)
    assert "model.target" in str(caught.value)


def test_a_target_with_no_close_name_suggests_nothing():
    from gradscope.errors import ConfigError
    from gradscope.targets import resolve

    with pytest.raises(ConfigError) as caught:
        resolve("gradscope.zoo:QwertyZxcv", CONFIGS, "model.target")
    assert "did you mean" not in str(caught.value)


def test_a_malformed_checkpointing_glob_is_refused_with_the_config_and_writes_no_report(tmp_path):
    """``modules: ['blocks.[0-']`` was caught only once the model was built, leaving a failed report."""
    from typer.testing import CliRunner

    from gradscope.cli import app

    text = (CONFIGS / "transformer_lm.yaml").read_text().replace('modules: ["blocks.*"]', "modules: ['blocks.[0-']")
    assert "blocks.[0-" in text
    path = tmp_path / "lm.yaml"
    path.write_text(text)
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["inspect", str(path), "--json", str(out)])
    assert result.exit_code == 2, result.output
    first = result.output.splitlines()[0]
    assert "checkpointing.modules[0]" in first and "lm.yaml:" in first and "never closed" in first
    assert not out.exists()


@pytest.mark.parametrize("pattern", ["blocks.[0-3]", "blocks.[!0]", "blocks.*", "blocks.[]]"])
def test_well_formed_checkpointing_globs_pass_the_config(pattern):
    from gradscope.config import CheckpointSpec

    assert CheckpointSpec(modules=[pattern]).modules == [pattern]


def test_multihead_attention_out_proj_is_drawn_with_its_attention_block():
    """``out_proj`` is never called as a module (MultiheadAttention uses its weight directly), so every
    ``blocks.N.attn.out_proj.weight`` was drawn after the last MLP in the input -> output order."""
    from gradscope.reporters.plot import _layers

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return x + self.mlp(x)

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[Block() for _ in range(3)], torch.nn.Linear(16, 4))
    with gradscope.watch(model) as scope:
        model(torch.randn(2, 5, 16)).sum().backward()
        scope.step()
    assert "0.attn.out_proj" not in scope.report.called_modules  # what put it last
    layers = _layers(scope.report)
    for n in range(3):
        at = layers.index(f"{n}.attn.out_proj.weight")
        assert layers.index(f"{n}.attn.in_proj_weight") < at < layers.index(f"{n}.mlp.0.weight")
    assert layers[-1] == "3.weight"
