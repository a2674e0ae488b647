"""--baseline / --update-baseline: the regression gate on per-layer gradient norms."""

import json

from typer.testing import CliRunner

from gradscope.cli import app

runner = CliRunner()
CONFIG = """
model:
  target: gradscope.zoo:mlp
  args: {{in_features: 16, hidden: 32, depth: {depth}, classes: 4, init: {init}, init_std: 0.001}}
data: {{batch_size: 16, input: {{shape: [16]}}, labels: {{classes: 4}}}}
steps: 2
"""


def write(tmp_path, name: str, depth: int = 3, init: str = "default") -> str:
    path = tmp_path / name
    path.write_text(CONFIG.format(depth=depth, init=init))
    return str(path)


def inspect(*args: str):
    return runner.invoke(app, ["inspect", *args, "--fail-on", "warning"])


def test_same_config_matches_its_baseline(tmp_path):
    config, base = write(tmp_path, "a.yaml"), str(tmp_path / "base.json")
    assert inspect(config, "--baseline", base, "--update-baseline").exit_code == 0
    assert json.loads((tmp_path / "base.json").read_text())["schema_version"] == 1
    assert inspect(config, "--baseline", base).exit_code == 0


def test_changed_init_is_a_drift_at_the_first_layer_that_moved(tmp_path):
    base = str(tmp_path / "base.json")
    inspect(write(tmp_path, "a.yaml"), "--baseline", base, "--update-baseline")
    out = tmp_path / "r.json"
    result = inspect(write(tmp_path, "b.yaml", init="normal"), "--baseline", base, "--json", str(out))
    assert result.exit_code == 1
    (drift,) = [a for a in json.loads(out.read_text())["anomalies"] if a["kind"] == "baseline_drift"]
    assert drift["parameter"] == "inp.weight" and drift["step"] == 0
    moved = drift["evidence"]["inp.weight"]
    assert moved["now"] < moved["baseline"] / 10


def test_removed_layer_is_a_drift(tmp_path):
    base = str(tmp_path / "base.json")
    inspect(write(tmp_path, "a.yaml", depth=3), "--baseline", base, "--update-baseline")
    out = tmp_path / "r.json"
    assert inspect(write(tmp_path, "b.yaml", depth=2), "--baseline", base, "--json", str(out)).exit_code == 1
    drifts = [a for a in json.loads(out.read_text())["anomalies"] if a["kind"] == "baseline_drift"]
    assert any("blocks.2.linear.weight" in a["evidence"].get("removed", []) for a in drifts)


def test_update_baseline_needs_a_path(tmp_path):
    result = inspect(write(tmp_path, "a.yaml"), "--update-baseline")
    assert result.exit_code == 2 and "--baseline" in result.stderr
