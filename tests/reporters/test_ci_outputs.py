"""CI outputs: JUnit marks checks that did not run as skipped; GitHub and JUnit show one entry per
group of findings; the progress line and the grouping helpers on their own."""

import io
import xml.etree.ElementTree as ET

from typer.testing import CliRunner

from gradscope.cli import app
from gradscope.report import Anomaly, StepRecord
from gradscope.reporters.findings import compress_names, group
from gradscope.reporters.layout import elide
from gradscope.reporters.progress import ProgressReporter
from tests.conftest import CONFIGS

runner = CliRunner()
FAULTS = CONFIGS / "faults"


def junit_cases(tmp_path, *args: str) -> tuple[ET.Element, dict[str, ET.Element]]:
    out = tmp_path / "junit.xml"
    runner.invoke(app, ["inspect", *args, "--junit", str(out)])
    suite = ET.parse(out).getroot()
    return suite, {c.get("name"): c for c in suite.iter("testcase")}


def test_junit_marks_checks_that_did_not_run_as_skipped(tmp_path):
    suite, cases = junit_cases(tmp_path, str(FAULTS / "nan_forward.yaml"))
    for kind in ("wrong_gradient", "baseline_drift", "rank_divergence", "loss_scale_overflow"):
        assert cases[kind].find("skipped") is not None, kind
    assert "--baseline" in cases["baseline_drift"].find("skipped").get("message")
    assert cases["nonfinite_forward"].find("failure") is not None and cases["nonfinite_forward"].find("skipped") is None
    assert cases["vanishing_gradient"].find("skipped") is None  # it ran and found nothing: a pass
    assert int(suite.get("skipped")) == sum(c.find("skipped") is not None for c in cases.values())


def test_junit_check_that_ran_is_not_skipped(tmp_path):
    _, cases = junit_cases(tmp_path, str(FAULTS / "wrong_gradient.yaml"))
    assert cases["wrong_gradient"].find("failure") is not None
    base = tmp_path / "base.json"
    runner.invoke(app, ["inspect", str(FAULTS / "dead_relu.yaml"), "--baseline", str(base), "--update-baseline"])
    _, cases = junit_cases(tmp_path, str(FAULTS / "dead_relu.yaml"), "--baseline", str(base))
    assert cases["baseline_drift"].find("skipped") is None


def test_junit_failure_lists_a_group_once(tmp_path):
    _, cases = junit_cases(tmp_path, str(FAULTS / "dead_relu.yaml"), "--fail-on", "warning")
    text = cases["dead_relu"].find("failure").text
    assert text.count("\n") == 0 and text.startswith("[error] blocks.{0-2}.act, step 0: 3 findings")


def test_github_annotation_per_group(monkeypatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    result = runner.invoke(app, ["inspect", str(FAULTS / "dead_relu.yaml")])
    commands = [x for x in result.stderr.splitlines() if x.startswith("::")]
    assert len(commands) == 1
    assert "title=gradscope dead_relu x3" in commands[0] and "3 findings in blocks.{0-2}.act" in commands[0]


def finding(module: str, fraction: float, step: int = 0) -> Anomaly:
    message = f"{fraction:.0%} of the 64 units of the ReLU in {module} ({module}.py:3) are dead."
    return Anomaly("dead_relu", "warning", message, module=module, step=step, evidence={"fraction": fraction})


def test_group_by_kind_and_cause_with_layers_and_range():
    found = [finding(f"blocks.{i}.act", 0.5 + i / 10, step=i // 2) for i in range(4)]
    other = Anomaly("unused_parameter", "warning", "head.weight got no gradient", module="head")
    (dead, unused) = group([*found, other])
    assert len(dead.anomalies) == 4 and unused.anomalies == (other,)
    assert dead.where() == "blocks.{0-3}.act, steps 0-1"
    assert dead.spread() == "fraction 50%-80%"


def test_compress_names():
    assert compress_names(["a.0.w", "a.1.w", "a.2.w", "a.5.w"]) == "a.{0-2,5}.w"
    assert compress_names(["x", "y"]) == "x, y"
    assert compress_names([f"n{i}x" + "y" * i for i in range(8)]).endswith("and 2 more")


def test_elide_keeps_weight_and_bias_apart():
    names = ["blocks.2.linear.weight", "blocks.2.linear.bias", "blocks.12.linear.weight"]
    short = elide(names, 17)
    assert len(set(short)) == 3 and all(len(n) <= 17 for n in short)
    assert all("…" in n and not n.endswith("…") for n in short if len(n) > 16)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_counts_steps_and_time_left():
    stream, now = Tty(), iter([0.0, 2.0, 4.0])
    progress = ProgressReporter(4, stream, clock=lambda: next(now))
    record = StepRecord(step=0, loss=2.5, grad_norm_total=1.25, parameters={}, modules={})
    progress.on_step(record)
    progress.on_step(StepRecord(step=1, loss=2.0, grad_norm_total=1.0, parameters={}, modules={}))
    text = stream.getvalue()
    assert "step 1/4  loss 2.5  grad norm 1.25  ~6s left" in text
    assert "step 2/4  loss 2  grad norm 1  ~4s left" in text
    progress.close()
    assert stream.getvalue().endswith("\r\x1b[K")
    assert ProgressReporter.enabled(Tty()) and not ProgressReporter.enabled(io.StringIO())
