"""TensorBoard output, read back with tensorboard's EventAccumulator and checked against the JSON report."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from gradscope.cli import app
from tests.conftest import CONFIGS, TESTS

runner = CliRunner()


def events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_scalars_and_histograms_match_the_json_report(tmp_path):
    logdir, out = tmp_path / "tb", tmp_path / "r.json"
    config = str(CONFIGS / "faults" / "dead_relu.yaml")
    result = runner.invoke(app, ["inspect", config, "--steps", "3", "--logdir", str(logdir), "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    acc = events(logdir)
    assert scalars(acc, "loss") == pytest.approx({s["step"]: s["loss"] for s in report["steps"]})
    assert scalars(acc, "grad_norm/total") == pytest.approx({s["step"]: s["grad_norm_total"] for s in report["steps"]})
    out_weight = {s["step"]: s["parameters"]["out.weight"]["grad_norm"] for s in report["steps"]}
    assert scalars(acc, "grad_norm/out.weight") == pytest.approx(out_weight)
    dead = [t for t in acc.Tags()["scalars"] if t.startswith("dead_fraction/blocks.0.act")]
    assert dead and scalars(acc, dead[0])[0] == 1.0
    histogram = acc.Histograms("gradients/out.weight")
    assert [h.step for h in histogram] == [0]  # histograms_every defaults to 10
    assert histogram[0].histogram_value.num == 10 * 64
    tensors = acc.Tags()["tensors"]
    assert "config/text_summary" in tensors and "anomalies/dead_relu/text_summary" in tensors
    assert "custom_scalars__config__" in tensors


def test_all_nan_gradients_are_counted_not_plotted(tmp_path):
    logdir = tmp_path / "tb"
    config = str(CONFIGS / "faults" / "nan_forward.yaml")
    result = runner.invoke(
        app, ["inspect", config, "--logdir", str(logdir), "--check", "nonfinite_forward.severity=info"]
    )
    assert result.exit_code == 0, result.output
    acc = events(logdir)
    assert scalars(acc, "nonfinite/head.weight")[0] > 0
    assert "gradients/head.weight" not in acc.Tags()["histograms"]  # every value was NaN
    assert acc.Tags()["histograms"]  # the gradients that are partly finite still get one


def test_interrupted_run_leaves_its_steps_readable(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {{target: '{TESTS / 'models.py'}:FailsOnCall', args: {{call: 3, error: KeyboardInterrupt}}}}\n"
        "data: {input: {shape: [8]}, labels: {classes: 4}}\nsteps: 5\ntensorboard: {histograms_every: 1}\n"
    )
    logdir = tmp_path / "tb"
    result = runner.invoke(app, ["inspect", str(config), "--logdir", str(logdir)])
    assert result.exit_code == 130
    acc = events(logdir)
    assert sorted(scalars(acc, "loss")) == [0, 1]
    assert [h.step for h in acc.Histograms("gradients/lin.weight")] == [0, 1]
