"""The reporter container and its factory: which reporters a run gets, who writes, who streams."""

import io
import json

import gradscope
from gradscope.reporters import Outputs, Reporters, build_reporters
from gradscope.reporters.json import JsonReporter
from gradscope.reporters.terminal import TerminalReporter
from tests.conftest import config


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
