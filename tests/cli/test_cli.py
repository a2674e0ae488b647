"""The command line: every example config runs; bad input exits 2 with its key path; exit-code plumbing."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradscope import rules
from gradscope.cli import app
from gradscope.report import Anomaly, Report
from tests.conftest import CONFIGS, TESTS

runner = CliRunner()
MODELS_PY = TESTS / "models.py"


def invoke(*args: str) -> "object":
    return runner.invoke(app, list(args))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_healthy_example_config_runs_clean(path, tmp_path):
    out = tmp_path / "report.json"
    result = invoke("inspect", str(path), "--steps", "1", "--json", str(out), "--fail-on", "warning")
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["schema_version"] == 1
    step = data["steps"][0]
    assert step["step"] == 0 and isinstance(step["loss"], float) and step["grad_norm_total"] > 0
    assert all("grad_norm" in p for p in step["parameters"].values())
    assert [a for a in data["anomalies"] if a["severity"] != "info"] == []
    assert "per parameter" in result.stdout


def test_no_args_shows_help():
    result = invoke()
    assert "inspect" in result.output
    assert invoke("-h").exit_code == 0


def test_json_to_stdout_is_pure_json():
    result = invoke("inspect", str(CONFIGS / "faults" / "deep_sigmoid_mlp.yaml"), "--steps", "1", "--json", "-")
    assert result.exit_code == 1  # it finds the vanishing gradients
    data = json.loads(result.stdout)
    assert data["run"]["model"] == "MLP"
    assert "per parameter" in result.stderr


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text.replace("MODELS_PY", str(MODELS_PY)))
    return str(path)


BAD_CONFIGS = {
    "unknown key": (
        "model: {target: gradscope.zoo:mlp}\ndata: {input: {shape: [64]}}\nstepz: 3\n",
        ["config.yaml:3", "stepz", "unknown key", "steps"],
    ),
    "wrong type": (
        "model: {target: gradscope.zoo:mlp}\ndata:\n  batch_size: lots\n  input: {shape: [64]}\n",
        ["config.yaml:3", "data.batch_size", "integer", "'lots'"],
    ),
    "bad choice": (
        "model: {target: gradscope.zoo:mlp}\ndata: {input: {shape: [64]}}\nprecision: fp8\n",
        ["config.yaml:3", "precision", "'fp32', 'bf16' or 'fp16'", "'fp8'"],
    ),
    "missing key": ("data: {input: {shape: [64]}}\n", ["model", "required"]),
    "missing model file": (
        "model: {target: nothere/model.py:build}\ndata: {input: {shape: [64]}}\n",
        ["config.yaml:1", "model.target", "file not found"],
    ),
    "unimportable target": (
        "model: {target: no_such_pkg.models:build}\ndata: {input: {shape: [64]}}\n",
        ["model.target", "no module named 'no_such_pkg'"],
    ),
    "missing attribute": (
        "model: {target: 'gradscope.zoo:mpl'}\ndata: {input: {shape: [64]}}\n",
        ["model.target", "no attribute 'mpl'"],
    ),
    "target that raises": (
        "model: {target: 'MODELS_PY:Raises', args: {fail_in: init}}\ndata: {input: {shape: [8]}}\n",
        ["model", "ValueError: bad width 7", "models.py:"],
    ),
    "wrong model arguments": (
        "model:\n  target: gradscope.zoo:mlp\n  args: {depht: 3}\ndata: {input: {shape: [8]}}\n",
        ["config.yaml:3", "model.args", "depht"],
    ),
    "batch that does not fit": (
        "model: {target: gradscope.zoo:mlp, args: {in_features: 64}}\ndata: {input: {shape: [32]}, labels: {classes: 10}}\n",
        ["model", "forward pass", "(8, 32)", "mat1 and mat2"],
    ),
    "loss not a scalar": (
        "model: {target: 'MODELS_PY:VectorLoss'}\ndata: {input: {shape: [8]}, labels: {shape: []}}\nloss: output\n",
        ["config.yaml:3", "loss", "scalar", "(8,)"],
    ),
    "unknown loss": (
        "model: {target: gradscope.zoo:mlp}\ndata: {input: {shape: [64]}}\nloss: xent\n",
        ["config.yaml:3", "loss", "cross_entropy", "'xent'"],
    ),
    "not yaml": ("model: {target: x\ndata: [\n", ["not valid YAML", "line 2"]),
    "not a module": (
        "model: {target: 'MODELS_PY:not_a_module'}\ndata: {input: {shape: [8]}}\n",
        ["model.target", "torch.nn.Module", "int"],
    ),
    "bad optimizer argument": (
        "model: {target: gradscope.zoo:mlp}\ndata: {input: {shape: [64]}}\noptimizer: {name: adamw, momentum: 0.9}\n",
        ["config.yaml:3", "optimizer.momentum", "weight_decay"],
    ),
    "checkpoint pattern matches nothing": (
        "model: {target: gradscope.zoo:mlp}\ndata: {input: {shape: [64]}}\ncheckpointing: {modules: [layers.*]}\n",
        ["config.yaml:3", "checkpointing.modules[0]", "matches no module", "blocks.0"],
    ),
    "bad device": (
        "model: {target: gradscope.zoo:mlp}\ndata: {input: {shape: [64]}}\ndevice: tpu\n",
        ["config.yaml:3", "device", "cuda:N", "'tpu'"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_2_with_key_path(case, tmp_path):
    text, expected = BAD_CONFIGS[case]
    result = invoke("inspect", write(tmp_path, text))
    assert result.exit_code == 2, result.output
    for fragment in expected:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_missing_config_file_exits_2(tmp_path):
    result = invoke("inspect", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    assert "cannot read config file" in result.stderr


def test_verbose_shows_the_traceback(tmp_path):
    text = "model: {target: 'MODELS_PY:Raises', args: {fail_in: forward}}\ndata: {input: {shape: [8]}}\n"
    result = invoke("inspect", write(tmp_path, text), "-v")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "boom in forward" in result.stderr


def test_interrupted_run_writes_what_it_measured(tmp_path):
    text = (
        "model: {target: 'MODELS_PY:FailsOnCall', args: {call: 3, error: KeyboardInterrupt}}\n"
        "data: {input: {shape: [8]}, labels: {classes: 4}}\nsteps: 5\n"
    )
    out = tmp_path / "r.json"
    result = invoke("inspect", write(tmp_path, text), "--json", str(out))
    assert result.exit_code == 130
    data = json.loads(out.read_text())
    assert data["run"]["status"] == "interrupted"
    assert [s["step"] for s in data["steps"]] == [0, 1]


def test_failed_run_writes_what_it_measured(tmp_path):
    text = (
        "model: {target: 'MODELS_PY:FailsOnCall', args: {call: 2}}\ndata: {input: {shape: [8]}, labels: {classes: 4}}\n"
    )
    out = tmp_path / "r.json"
    result = invoke("inspect", write(tmp_path, text), "--json", str(out))
    assert result.exit_code == 2
    data = json.loads(out.read_text())
    assert data["run"]["status"] == "failed" and "stop here" in data["run"]["error"]
    assert len(data["steps"]) == 1


def warn_on_every_run(report: Report, check: object) -> list[Anomaly]:
    return [Anomaly(kind="zero_gradient", severity="warning", message="test finding", parameter="out.weight", step=0)]


@pytest.mark.parametrize("fail_on, code", [("error", 0), ("warning", 1), ("info", 1), ("never", 0)])
def test_fail_on_sets_the_exit_code(fail_on, code, monkeypatch):
    monkeypatch.setattr(rules, "RULES", (("zero_gradient", warn_on_every_run),))
    result = invoke("inspect", str(CONFIGS / "residual_mlp.yaml"), "--steps", "1", "--fail-on", fail_on)
    assert result.exit_code == code, result.output
    assert "zero_gradient" in result.stdout


def test_internal_error_exits_3(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("gradscope.stats.total_norm", broken)
    result = invoke("inspect", str(CONFIGS / "faults" / "deep_sigmoid_mlp.yaml"), "--steps", "1")
    assert result.exit_code == 3
    assert "internal error" in result.stderr and "a bug" in result.stderr


def test_long_tables_are_truncated_unless_all():
    path = str(CONFIGS / "faults" / "deep_sigmoid_mlp.yaml")
    short = invoke("inspect", path, "--steps", "1").stdout
    full = invoke("inspect", path, "--steps", "1", "--all").stdout
    assert "more rows" in short and "--all shows every row" in short
    assert "blocks.15.linear.weight" in full and "blocks.15.linear.weight" not in short
    assert "inp.weight" in short and "out.bias" in short


def test_output_has_no_color_codes_when_not_a_terminal():
    result = invoke("inspect", str(CONFIGS / "faults" / "deep_sigmoid_mlp.yaml"), "--steps", "1")
    assert not re.search(r"\x1b\[", result.stdout)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("gradscope ")


FAULTS = CONFIGS / "faults"


def test_check_override_from_the_command_line():
    path = str(FAULTS / "dead_relu.yaml")
    assert invoke("inspect", path, "--fail-on", "warning").exit_code == 1
    assert invoke("inspect", path, "--fail-on", "warning", "--check", "dead_relu.severity=off").exit_code == 0
    assert invoke("inspect", path, "--check", "dead_relu.severity=error").exit_code == 1
    bad = invoke("inspect", path, "--check", "dead_relu")
    assert bad.exit_code == 2 and "KIND.KEY=VALUE" in bad.stderr


def test_junit_has_one_case_per_check_and_fails_the_found_one(tmp_path):
    import xml.etree.ElementTree as ET

    out = tmp_path / "junit.xml"
    invoke("inspect", str(FAULTS / "nan_forward.yaml"), "--junit", str(out))
    suite = ET.parse(out).getroot()
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert "nonfinite_forward" in cases and "dead_relu" in cases and len(cases) == int(suite.get("tests"))
    assert cases["nonfinite_forward"].find("failure") is not None
    assert cases["dead_relu"].find("failure") is None
    assert suite.get("failures") == "1"


def test_github_annotations_and_summary(tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = invoke("inspect", str(FAULTS / "nan_forward.yaml"))
    assert result.exit_code == 1
    line = next(x for x in result.stderr.splitlines() if x.startswith("::error "))
    assert "file=" in line and "faults.py" in line and "line=" in line and "title=gradscope nonfinite_forward" in line
    assert "| error | `nonfinite_forward` | `blocks.2` |" in summary.read_text()


def test_gradcheck_flag_enables_the_check():
    path = str(FAULTS / "wrong_gradient.yaml")
    text = Path(path).read_text().replace("gradcheck: true\n", "")
    off = Path(path).with_name("tmp_no_gradcheck.yaml")
    off.write_text(text)
    try:
        assert invoke("inspect", str(off)).exit_code == 0
        result = invoke("inspect", str(off), "--gradcheck")
        assert result.exit_code == 1 and "wrong_gradient" in result.stdout
    finally:
        off.unlink()


def test_error_while_reporting_is_an_internal_error(monkeypatch):
    monkeypatch.setattr(rules, "RULES", (("zero_gradient", lambda report: []),))  # wrong signature: a bug
    result = invoke("inspect", str(CONFIGS / "residual_mlp.yaml"), "--steps", "1")
    assert result.exit_code == 3 and "internal error" in result.stderr
