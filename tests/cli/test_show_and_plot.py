"""`gradscope show` re-renders a saved report; `--plot` saves the gradient-flow picture."""

import sys

from typer.testing import CliRunner

from gradscope.cli import app
from tests.conftest import CONFIGS

runner = CliRunner()
SIGMOID = str(CONFIGS / "faults" / "deep_sigmoid_mlp.yaml")
PNG = b"\x89PNG\r\n\x1a\n"


def test_show_renders_a_saved_report_like_inspect(tmp_path):
    out = tmp_path / "r.json"
    first = runner.invoke(app, ["inspect", SIGMOID, "--steps", "1", "--json", str(out)])
    shown = runner.invoke(app, ["show", str(out)])
    assert shown.exit_code == first.exit_code == 1
    # Only the list of files written differs: show writes none.
    assert shown.stdout == "".join(x for x in first.stdout.splitlines(True) if not x.startswith("wrote "))
    assert runner.invoke(app, ["show", str(out), "--fail-on", "never"]).exit_code == 0


def test_show_rejects_what_is_not_a_report(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 99}')
    result = runner.invoke(app, ["show", str(bad)])
    assert result.exit_code == 2 and "schema_version 1" in result.stderr
    assert runner.invoke(app, ["show", str(tmp_path / "missing.json")]).exit_code == 2


def test_plot_from_inspect_and_from_show(tmp_path):
    out, first, second = tmp_path / "r.json", tmp_path / "a.png", tmp_path / "b.png"
    runner.invoke(app, ["inspect", SIGMOID, "--steps", "2", "--json", str(out), "--plot", str(first)])
    runner.invoke(app, ["show", str(out), "--plot", str(second)])
    assert first.read_bytes()[:8] == PNG and second.read_bytes()[:8] == PNG


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    result = runner.invoke(app, ["inspect", SIGMOID, "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "pip install 'gradscope[plot]'" in result.stderr


def test_tensorboard_gets_the_picture(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runner.invoke(app, ["inspect", SIGMOID, "--steps", "1", "--logdir", str(tmp_path / "tb")])
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "gradient_flow" in acc.Tags()["images"]
