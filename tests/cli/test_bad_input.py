"""User mistakes end in exit 2 and one line naming the option, key or file; outputs are checked
before the run and written independently; signals leave a valid report."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradscope.cli import app
from tests.conftest import ROOT

runner = CliRunner()
TESTS = Path(__file__).resolve().parents[1]
TINY = """model: {target: gradscope.zoo:mlp, args: {in_features: 4, hidden: 4, depth: 2, classes: 2}}
data: {batch_size: 4, input: {shape: [4]}, labels: {classes: 2}}
steps: 1
"""


def config(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def leaving(tmp_path: Path, mode: str, steps: int = 1) -> Path:
    return config(
        tmp_path,
        f"model: {{target: {TESTS / 'bad_models.py'}:Leaving, args: {{mode: {mode}}}}}\n"
        f"data: {{batch_size: 4, input: {{shape: [4]}}, labels: {{classes: 2}}}}\nsteps: {steps}\n",
    )


def error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return next(line for line in result.output.splitlines() if "error:" in line)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--json", "/proc/gradscope.json"],
            "--json: cannot write /proc/gradscope.json: cannot create a file in /proc",
        ),
        (["--json", "{tmp}"], "--json: cannot write {tmp}: it is a folder"),
        (["--json", ""], "--json: cannot write '': the path is empty"),
        (["--json", "{tmp}/cfg.yaml"], "that is the config file"),
        (["--logdir", "{tmp}/cfg.yaml"], "--logdir: cannot write {tmp}/cfg.yaml: it is a file, not a folder"),
        (["--plot", "{tmp}/flow.xyz"], "--plot: cannot write {tmp}/flow.xyz: matplotlib cannot write .xyz"),
        (["--junit", "/proc/j.xml"], "--junit: cannot write /proc/j.xml"),
        (["--json", "-", "--junit", "-"], "--junit: cannot write -: --json writes there too"),
        (["--update-baseline", "--baseline", "/proc/b.json"], "--update-baseline: cannot write /proc/b.json"),
    ],
)
def test_unwritable_output_is_refused_before_the_run(args, expected, tmp_path, monkeypatch):
    path = config(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = runner.invoke(app, ["inspect", str(path), *args])
    assert expected.replace("{tmp}", str(tmp_path)) in error_line(result)
    assert "per step" not in result.output  # refused before the run, not after it


def test_one_failing_output_does_not_stop_the_others(tmp_path, monkeypatch):
    from gradscope import outfiles

    real = outfiles.write_bytes

    def failing(option, path, data):
        if option == "--plot":
            raise outfiles.OutputError(option, path, "No space left on device")
        real(option, path, data)

    monkeypatch.setattr(outfiles, "write_bytes", failing)
    path = config(tmp_path)
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["inspect", str(path), "--plot", str(tmp_path / "f.png"), "--json", str(out)])
    assert "--plot: cannot write" in error_line(result)
    assert json.loads(out.read_text())["run"]["status"] == "completed"


def test_json_goes_through_a_symlink(tmp_path):
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    link.symlink_to(target)
    result = runner.invoke(app, ["inspect", str(config(tmp_path)), "--json", str(link)])
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and json.loads(target.read_text())["schema_version"] == 1


def test_junit_dash_is_stdout(tmp_path):
    result = runner.invoke(app, ["inspect", str(config(tmp_path)), "--junit", "-"])
    assert result.exit_code == 0, result.output
    assert "<testsuite" in result.stdout and not (Path.cwd() / "-").exists()


def test_json_on_stdout_stays_json_when_the_model_prints(tmp_path):
    model = tmp_path / "printing.py"
    model.write_text(
        "import torch\nclass P(torch.nn.Linear):\n    def forward(self, x):\n"
        "        print('hello from forward')\n        return super().forward(x)\n"
    )
    path = config(
        tmp_path,
        TINY.replace("gradscope.zoo:mlp", "printing.py:P").replace(
            "in_features: 4, hidden: 4, depth: 2, classes: 2", "in_features: 4, out_features: 2"
        ),
    )
    result = runner.invoke(app, ["inspect", str(path), "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["run"]["status"] == "completed"
    assert "hello from forward" in result.stderr


def test_json_on_stdout_stays_json_when_c_code_writes_to_file_descriptor_1(tmp_path):
    """A C library's printf bypasses sys.stdout: the descriptor itself points at stderr during the run."""
    import subprocess
    import sys

    model = tmp_path / "printing.py"
    model.write_text(
        "import os, torch\nclass P(torch.nn.Linear):\n    def forward(self, x):\n"
        "        os.write(1, b'written to fd 1\\n')\n        return super().forward(x)\n"
    )
    path = config(
        tmp_path,
        TINY.replace("gradscope.zoo:mlp", "printing.py:P").replace(
            "in_features: 4, hidden: 4, depth: 2, classes: 2", "in_features: 4, out_features: 2"
        ),
    )
    done = subprocess.run(
        [sys.executable, "-m", "gradscope", "inspect", str(path), "--json", "-"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["run"]["status"] == "completed"
    assert "written to fd 1" in done.stderr


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("factory_exit", "model: building the model called sys.exit(3)"),
        ("forward_exit", "the forward pass on inputs (4, 4) float32, labels (4,) int64 called sys.exit(0)"),
        ("meta", "layer.weight (and 1 more) is on the meta device"),
    ],
)
def test_user_code_leaving_is_exit_2_naming_its_line(mode, expected, tmp_path):
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["inspect", str(leaving(tmp_path, mode)), "--json", str(out)])
    line = error_line(result)
    assert expected in line
    if mode != "meta":
        assert "bad_models.py:" in line
    if mode == "forward_exit":
        assert json.loads(out.read_text())["run"]["status"] == "failed"


def test_argparse_in_user_code_sees_no_gradscope_option(tmp_path):
    result = runner.invoke(app, ["inspect", str(leaving(tmp_path, "argparse")), "--steps", "1"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("mode", ["sigterm", "double_sigint"])
def test_signals_leave_a_valid_interrupted_report(mode, tmp_path):
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["inspect", str(leaving(tmp_path, mode, steps=4)), "--json", str(out)])
    assert result.exit_code == 130, result.output
    run = json.loads(out.read_text())["run"]
    assert run["status"] == "interrupted" and run["steps_completed"] >= 1


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("every: yes", "every: expected a number, got True"),
        ("seed: 100000000000000000000000", "seed: Input should be less than"),
        ("optimizer: {name: adam, betas: [0.9]}", "optimizer.betas: expected a list of 2 numbers"),
        ("optimizer: {name: adam, betas: [0.9, 1.5]}", "optimizer.betas: Adam refused it: Invalid beta"),
        ("optimizer: {name: adam, lr: .inf}", "optimizer.lr: Input should be a finite number"),
        ("optimizer: {name: adam, eps: '1e-8'}", "optimizer.eps: expected a number, got '1e-8'"),
        ("optimizer: {name: sgd, momentum: -1}", "optimizer.momentum: SGD refused it"),
        ("loss: {name: cross_entropy, args: {x: 1}}", "takes no `args`"),
        ("clip: {max_norm: .nan}", "clip.max_norm: Input should be a finite number"),
    ],
)
def test_schema_values_are_checked_where_read(extra, expected, tmp_path):
    line = error_line(runner.invoke(app, ["inspect", str(config(tmp_path, TINY + extra + "\n"))]))
    assert expected in line and "cfg.yaml:4:" in line


@pytest.mark.parametrize(
    "data", ["batch_size: 1000000000000, input: {shape: [4]}", "input: {shape: [100000, 100000, 100]}"]
)
def test_batch_larger_than_memory_names_its_key(data, tmp_path):
    text = TINY.replace("batch_size: 4, input: {shape: [4]}", data)
    line = error_line(runner.invoke(app, ["inspect", str(config(tmp_path, text))]))
    assert "data." in line and "GiB; this machine has" in line


def _saved(tmp_path: Path) -> dict:
    out = tmp_path / "good.json"
    assert runner.invoke(app, ["inspect", str(config(tmp_path)), "--json", str(out)]).exit_code == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (lambda d: b"\xff\xfe{}", "not UTF-8 text"),
        (lambda d: json.dumps(d)[:500].encode(), "is not JSON (truncated?)"),
        (lambda d: {**d, "steps": [1]}, "steps[0]: expected an object (StepRecord), got 1"),
        (lambda d: {**d, "anomalies": [{"kind": "x", "severity": "fatal", "message": "m"}]}, "anomalies[0].severity"),
        (lambda d: {**d, "run": {**d["run"], "steps_completed": "3"}}, "run.steps_completed: expected an integer"),
    ],
)
def test_bad_report_is_exit_2_naming_the_field(spoil, expected, tmp_path):
    data = spoil(_saved(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    assert expected in error_line(runner.invoke(app, ["show", str(bad)]))
    assert expected in error_line(runner.invoke(app, ["inspect", str(config(tmp_path)), "--baseline", str(bad)]))
