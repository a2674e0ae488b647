"""CI output: GitHub Actions annotations and step summary, and JUnit XML for any CI."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import IO
from xml.etree import ElementTree as ET

from gradscope.config import Checks
from gradscope.report import Anomaly, Report, StepRecord

KINDS = tuple(name for name in Checks.model_fields if name != "ignore")
_LEVEL = {"error": "error", "warning": "warning", "info": "notice"}


class GithubReporter:
    """``::error``/``::warning`` workflow commands per finding (stderr) and a Markdown summary
    appended to ``$GITHUB_STEP_SUMMARY``. Active when ``GITHUB_ACTIONS=true``.

    Args:
        config: the config file, where findings without a source line are annotated.
        stream: where the workflow commands go.
    """

    def __init__(self, config: str | None, stream: IO[str] | None = None) -> None:
        self.config = config
        self.stream = stream or sys.stderr

    def on_step(self, step: StepRecord) -> None:
        return None  # writes the whole report at the end

    def write(self, report: Report) -> None:
        for anomaly in report.anomalies:
            self.stream.write(self._command(anomaly) + "\n")
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as f:
                f.write(markdown_summary(report))

    def _command(self, a: Anomaly) -> str:
        file, line = source_location(a)
        file = file or self.config
        props = [f"file={_escape_prop(file)}"] if file else []
        if line:
            props.append(f"line={line}")
        props.append(f"title={_escape_prop(f'gradscope {a.kind}')}")
        return f"::{_LEVEL[a.severity]} {','.join(props)}::{_escape(a.message)}"

    def close(self) -> None:
        self.stream.flush()


def markdown_summary(report: Report) -> str:
    """A Markdown table of the findings, for a CI job summary."""
    run = report.run
    head = f"### gradscope: {run.model} ({run.config or 'config'}), {run.steps_completed} steps, {run.precision}\n\n"
    if not report.anomalies:
        return head + "No anomalies found.\n\n"
    rows = ["| severity | kind | where | step | finding |", "|---|---|---|---|---|"]
    for a in report.anomalies:
        where = a.module or a.parameter or ""
        message = a.message.replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {a.severity} | `{a.kind}` | `{where}` | {'' if a.step is None else a.step} | {message} |")
    return head + "\n".join(rows) + "\n\n"


class JunitReporter:
    """JUnit XML: one test case per check, failing when it has a finding at or above ``fail_on``.

    Args:
        path: the XML file to write.
        fail_on: the ``--fail-on`` severity (``never``: no case fails).
    """

    def __init__(self, path: str, fail_on: str) -> None:
        self.path, self.fail_on = path, fail_on

    def on_step(self, step: StepRecord) -> None:
        return None  # writes the whole report at the end

    def write(self, report: Report) -> None:
        failing = {id(a) for a in report.at_or_above(self.fail_on)}
        name = report.run.config or report.run.model
        suite = ET.Element("testsuite", name=f"gradscope {name}", tests=str(len(KINDS)))
        failures = 0
        for kind in KINDS:
            case = ET.SubElement(suite, "testcase", classname=f"gradscope.{Path(name).stem}", name=kind)
            found = [a for a in report.anomalies if a.kind == kind]
            bad = [a for a in found if id(a) in failing]
            if bad:
                failures += 1
                text = "\n".join(
                    f"[{a.severity}] {a.module or a.parameter or ''} step {a.step}: {a.message}" for a in bad
                )
                ET.SubElement(case, "failure", message=bad[0].message[:200], type=bad[0].severity).text = text
            elif found:
                ET.SubElement(case, "system-out").text = "\n".join(f"[{a.severity}] {a.message}" for a in found)
        suite.set("failures", str(failures))
        if report.run.status != "completed":
            suite.set("errors", "1")
            ET.SubElement(suite, "system-err").text = f"run {report.run.status}: {report.run.error or ''}"
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        ET.ElementTree(suite).write(target, encoding="utf-8", xml_declaration=True)

    def close(self) -> None:
        return None


def source_location(a: Anomaly) -> tuple[str | None, int | None]:
    """The user file and line a finding points at, from its evidence (``path:line in func``)."""
    source = a.evidence.get("source") if isinstance(a.evidence, dict) else None
    if not isinstance(source, str):
        return None, None
    match = re.match(r"(.+?):(\d+)", source)
    if not match:
        return None, None
    path = match.group(1)
    try:
        path = os.path.relpath(path)
    except ValueError:
        pass
    return path, int(match.group(2))


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_prop(text: str) -> str:
    return _escape(text).replace(":", "%3A").replace(",", "%2C")
