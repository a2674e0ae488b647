"""The reporter container and its factory: which reporters a run gets, who writes, who streams."""

import io
import json

import pytest

import gradscope
from gradscope.report import Report
from gradscope.reporters import Outputs, Reporters, build_reporters
from gradscope.reporters.json import JsonReporter
from gradscope.reporters.terminal import TerminalReporter
from tests.conftest import ROOT, config


def test_only_rank_0_writes(tmp_path):
    wanted = Outputs(terminal=io.StringIO(), json=str(tmp_path / "r.json"), baseline=str(tmp_path / "b.json"))
    assert len(build_reporters(wanted, rank=1)) == 0
    made = build_reporters(wanted, rank=0)
    assert [type(r) for r in made.reporters] == [TerminalReporter, JsonReporter, JsonReporter]
    assert [type(r) for r in build_reporters(wanted).reporters] == [TerminalReporter, JsonReporter, JsonReporter]


def test_every_reporter_gets_each_step_and_the_report(tmp_path):
    path = tmp_path / "r.json"
    report = gradscope.inspect(config(steps=2))
    streamed = []

    class Streaming:
        def on_step(self, step):
            streamed.append(step.step)

        def write(self, report):
            streamed.append("written")

        def close(self):
            streamed.append("closed")

    reporters = Reporters([*build_reporters(Outputs(json=str(path))).reporters, Streaming()])
    for step in report.steps:
        reporters.on_step(step)
    reporters.write(report)
    assert streamed == [0, 1, "written", "closed"]
    assert json.loads(path.read_text())["steps"][1]["step"] == 1


def test_nothing_asked_for_builds_nothing():
    assert len(build_reporters(Outputs())) == 0


def _csv_rows(text):
    import csv
    import io

    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.parametrize("config", ["unused_detached", "nan_forward"])
def test_csv_holds_every_kept_steps_parameters_as_the_json_report_does(config, tmp_path):
    from typer.testing import CliRunner

    from gradscope.cli import app

    csv_path, json_path = tmp_path / "s.csv", tmp_path / "r.json"
    args = ["inspect", str(ROOT / "configs" / "faults" / f"{config}.yaml"), "--csv", str(csv_path)]
    result = CliRunner().invoke(app, [*args, "--json", str(json_path)])
    assert result.exit_code in (0, 1), result.output
    report = Report.from_dict(json.loads(json_path.read_text()))
    rows = _csv_rows(csv_path.read_text())
    assert len(rows) == sum(len(s.parameters) for s in report.steps)
    by_key = {(int(r["step"]), r["parameter"]): r for r in rows}
    for step in report.steps:
        for name, stats in step.parameters.items():
            row = by_key[(step.step, name)]
            for column in ("grad_norm", "grad_max_abs", "zero_fraction", "param_norm", "nan_count"):
                value = getattr(stats, column)
                if value is None:
                    assert row[column] == ""  # no gradient arrived
                else:
                    assert float(row[column]) == pytest.approx(value, nan_ok=True)
            assert float(row["grad_norm_total"]) == pytest.approx(step.grad_norm_total, nan_ok=True)
    empty = [r for r in rows if r["grad_norm"] == ""]
    nonfinite = [r for r in rows if r["nan_count"] not in ("", "0")]
    assert empty if config == "unused_detached" else nonfinite


def test_csv_on_stdout_is_the_whole_stdout(tmp_path):
    from typer.testing import CliRunner

    from gradscope.cli import app

    result = CliRunner().invoke(app, ["inspect", str(ROOT / "configs" / "lstm.yaml"), "--csv", "-"])
    assert result.exit_code == 0, result.output
    rows = _csv_rows(result.stdout)
    assert rows and all(float(r["grad_norm"]) > 0 for r in rows)
    assert "findings" not in result.stdout and "╭" not in result.stdout  # the human report went to stderr
