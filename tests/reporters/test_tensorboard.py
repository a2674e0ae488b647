"""TensorBoard output, read back with tensorboard's EventAccumulator and checked against the JSON report."""

import io
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.summary_pb2 import Summary
from typer.testing import CliRunner

import gradscope
from gradscope import zoo
from gradscope.cli import app
from gradscope.report import Histogram, StepRecord
from gradscope.reporters.tensorboard import QUEUE_STEPS, TensorBoardReporter, step_summary
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
    assert result.exit_code == 1, result.output  # dead_relu with no gradient upstream of the head: an error
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


def _watched_steps(logdir, steps: int, fail_after: int | None = None) -> None:
    torch.manual_seed(0)
    model = zoo.MLP(in_features=8, hidden=8, depth=3, classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 8), torch.randint(4, (16,))
    with gradscope.watch(model, optimizer, logdir=str(logdir), histograms_every=1):
        for i in range(steps):
            if i == fail_after:
                raise RuntimeError("the loop failed")
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()


def test_background_writer_loses_no_step_beyond_its_queue(tmp_path):
    steps = QUEUE_STEPS * 2 + 3  # more steps than the queue holds: the loop waits, nothing is dropped
    _watched_steps(tmp_path / "tb", steps)
    acc = events(tmp_path / "tb")
    assert sorted(scalars(acc, "grad_norm/total")) == list(range(steps))
    assert [h.step for h in acc.Histograms("gradients/out.weight")] == list(range(steps))
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


def test_steps_queued_before_an_error_in_the_loop_are_written(tmp_path):
    with pytest.raises(RuntimeError, match="the loop failed"):
        _watched_steps(tmp_path / "tb", 10, fail_after=5)
    acc = events(tmp_path / "tb")
    assert sorted(scalars(acc, "grad_norm/total")) == [0, 1, 2, 3, 4]
    assert len(acc.Histograms("gradients/out.weight")) == 5


def test_a_step_the_writer_thread_cannot_write_raises_on_the_next_call(tmp_path):
    reporter = TensorBoardReporter(str(tmp_path / "tb"))
    broken = Histogram(min="not a number", max=1.0, count=1, sum=1.0, sum_squares=1.0, nonfinite=0, buckets=(1,))
    reporter.on_step(StepRecord(0, 1.0, 1.0, {}, {}, histograms={"w": broken}))
    with pytest.raises(RuntimeError, match="writing the TensorBoard run .* failed"):
        reporter.close()


def test_one_event_per_step_holds_its_scalars_and_histograms():
    record = StepRecord(
        3, 0.5, 2.0, {}, {}, histograms={"w": Histogram(-1.0, 1.0, 4, 0.0, 2.0, 1, (1, 0, 3))}, clip_coefficient=0.25
    )
    summary = Summary.FromString(step_summary(record))
    tags = [v.tag for v in summary.value]
    assert tags == ["loss", "grad_norm/total", "clip/coefficient", "nonfinite/w", "gradients/w"]
    histogram = summary.value[-1].histo
    assert (histogram.num, list(histogram.bucket)) == (4, [1, 0, 3])
    assert list(histogram.bucket_limit) == pytest.approx([-1 / 3, 1 / 3, 1.0])


def test_gradient_flow_picture_is_a_png_of_the_stated_size(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    model = zoo.MLP(in_features=4, hidden=8, depth=2, classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer, logdir=str(tmp_path)):
        for _ in range(2):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(torch.randn(4, 4)), torch.tensor([0, 1, 2, 0])).backward()
            optimizer.step()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    (event,) = acc.Images("gradient_flow")
    assert event.step == 1 and event.encoded_image_string.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(event.encoded_image_string)) as picture:
        assert picture.size == (event.width, event.height) and event.width > 100
