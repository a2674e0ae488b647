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
from gradscope.reporters.findings import Group, compress_names, group
from gradscope.rules.common import clean_steps, totals
from gradscope.utils import outfiles

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
        for found in group(report.anomalies):
            self.stream.write(self._command(found) + "\n")
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as f:
                f.write(markdown_summary(report))

    def _command(self, found: Group) -> str:
        a = found.first
        file, line = source_location(a)
        file = file or self.config
        props = [f"file={_escape_prop(file)}"] if file else []
        if line:
            props.append(f"line={line}")
        count = f" x{len(found.anomalies)}" if len(found.anomalies) > 1 else ""
        props.append(f"title={_escape_prop(f'gradscope {a.kind}{count}')}")
        return f"::{_LEVEL[a.severity]} {','.join(props)}::{_escape(group_message(found))}"

    def close(self) -> None:
        self.stream.flush()


def markdown_summary(report: Report) -> str:
    """A Markdown table of the findings, for a CI job summary."""
    run = report.run
    head = f"### gradscope: {run.model} ({run.config or 'config'}), {run.steps_completed} steps, {run.precision}\n\n"
    if not report.anomalies:
        return head + "No anomalies found.\n\n"
    rows = ["| severity | kind | where | step | finding |", "|---|---|---|---|---|"]
    for found in group(report.anomalies):
        message = group_message(found, where=False).replace("|", "\\|").replace("\n", " ")
        count = f" x{len(found.anomalies)}" if len(found.anomalies) > 1 else ""
        places = compress_names(found.places) if found.places else ""
        rows.append(f"| {found.severity} | `{found.kind}`{count} | `{places}` | {found.steps()} | {message} |")
    return head + "\n".join(rows) + "\n\n"


def group_message(found: Group, where: bool = True) -> str:
    """One text for a group: the count, places and spread of the numbers, then the first message."""
    if len(found.anomalies) == 1:
        return found.first.message
    spread = found.spread()
    places = f" in {found.where()}" if where else ""
    first = found.first.module or found.first.parameter
    return (
        f"{len(found.anomalies)} findings{places}{f' ({spread})' if spread else ''}. "
        f"The first{f', {first}' if first else ''}: {found.first.message}"
    )


class JunitReporter:
    """JUnit XML: one test case per check, failing when it has a finding at or above ``fail_on``.

    Args:
        path: the XML file to write.
        fail_on: the ``--fail-on`` severity (``never``: no case fails).
    """

    def __init__(self, path: str, fail_on: str, baseline: bool = False, checks: Checks | None = None) -> None:
        self.path, self.fail_on, self.baseline = path, fail_on, baseline
        self.checks = checks or Checks()

    def on_step(self, step: StepRecord) -> None:
        return None  # writes the whole report at the end

    def write(self, report: Report) -> None:
        failing = {id(a) for a in report.at_or_above(self.fail_on)}
        name = report.run.config or report.run.model
        suite = ET.Element("testsuite", name=f"gradscope {name}", tests=str(len(KINDS)))
        skipped = not_run(report, self.baseline, self.checks)
        failures = skips = 0
        for kind in KINDS:
            case = ET.SubElement(suite, "testcase", classname=f"gradscope.{Path(name).stem}", name=kind)
            found = [a for a in report.anomalies if a.kind == kind]
            bad = group([a for a in found if id(a) in failing])
            if bad:
                failures += 1
                text = "\n".join(f"[{g.severity}] {g.where()}: {group_message(g, where=False)}" for g in bad)
                ET.SubElement(case, "failure", message=bad[0].first.message[:200], type=bad[0].severity).text = text
            elif found:
                text = "\n".join(f"[{g.severity}] {group_message(g)}" for g in group(found))
                ET.SubElement(case, "system-out").text = text
            elif kind in skipped:
                skips += 1
                ET.SubElement(case, "skipped", message=skipped[kind])
        suite.set("failures", str(failures))
        suite.set("skipped", str(skips))
        if report.run.status != "completed":
            suite.set("errors", "1")
            ET.SubElement(suite, "system-err").text = f"run {report.run.status}: {report.run.error or ''}"
        xml = ET.tostring(suite, encoding="utf-8", xml_declaration=True)
        outfiles.write_bytes("--junit", self.path, xml)

    def close(self) -> None:
        return None


def not_run(report: Report, baseline: bool, checks: Checks | None = None) -> dict[str, str]:
    """The checks this run could not make, each with why: JUnit counts them as skipped, not passed."""
    steps = report.steps
    run = report.run
    checks = checks or Checks()
    clean = totals(report).clean_steps if totals(report) is not None else len(clean_steps(report))
    kinds = {a.kind for step in steps for a in step.activations.values()}
    out = {
        "wrong_gradient": "no custom autograd.Function was checked (--gradcheck checks those the model calls)",
        "baseline_drift": "no --baseline report to compare with",
        "rank_divergence": "needs a DDP run of several processes (--distributed ddp under torchrun)",
        "loss_scale_overflow": "no grad scaler in this run (fp16 only)",
        "gradient_underflow": "no fp32 comparison in this run (bf16/fp16, one process)",
        "gradient_clipping": "no gradient clipping in this run",
        "dead_relu": "no ReLU ran in the measured forward passes",
        "saturated_activation": "no sigmoid or tanh ran in the measured forward passes",
        "update_ratio": "the update_ratio probe was off (`probes: [update_ratio]`)",
        "memory_budget": "no memory budget (`memory: {budget: 6GiB}` or --memory-budget)",
        "memory_growth": "no --baseline report with a memory ledger to compare with",
        "not_in_optimizer": "no optimizer was watched (gradscope.watch(model, optimizer) or a trainer callback)",
        "no_update": "no optimizer was watched (gradscope.watch(model, optimizer) or a trainer callback)",
        "step_not_called": "not a watched training loop (gradscope.watch or a trainer callback)",
        "eval_mode": "not a watched training loop (gradscope.watch or a trainer callback)",
    }
    for kind in ("loss_spike", "gradient_spike"):  # a step is judged against at least min_steps before it
        need = checks.rule(kind).min_steps
        out[kind] = f"needs more than {need} clean steps (checks.{kind}.min_steps); the run made {clean}"
    ran = {
        "wrong_gradient": bool(report.gradchecks),
        "baseline_drift": baseline,
        "rank_divergence": bool(run.distributed) and (run.distributed or {}).get("strategy") == "ddp",
        "loss_scale_overflow": any(s.loss_scale is not None for s in steps),
        "gradient_underflow": any(s.underflow is not None for s in steps),
        "gradient_clipping": any(s.clip_coefficient is not None for s in steps) or bool(run.clip),
        "dead_relu": "relu" in kinds,
        "saturated_activation": bool(kinds & {"sigmoid", "tanh"}),
        "update_ratio": any("update_ratio" in s.probes for s in steps),
        "memory_budget": report.memory is not None and report.memory.plan is not None,
        "memory_growth": baseline and report.memory is not None,
        "loss_spike": clean > checks.loss_spike.min_steps,
        "gradient_spike": clean > checks.gradient_spike.min_steps,
        "not_in_optimizer": run.loop is not None and run.loop.optimizer,
        "no_update": run.loop is not None and run.loop.optimizer,
        "step_not_called": run.loop is not None,
        "eval_mode": run.loop is not None,
    }
    return {kind: why for kind, why in out.items() if not ran[kind]}


def error_command(exc: BaseException) -> str:
    """An ``::error`` workflow command for an error that stopped the run (exit 2), placed at the
    user's line the message names (the frame that raised, else the config's key)."""
    text = str(exc)
    match = re.search(r"\(at (.+?):(\d+) in ", text) or re.search(r"([^\s:()]+\.(?:py|ya?ml)):(\d+)", text)
    props = []
    if match:
        path = match.group(1)
        try:
            path = os.path.relpath(path)
        except ValueError:
            pass
        props = [f"file={_escape_prop(path)}", f"line={match.group(2)}"]
    props.append(f"title={_escape_prop('gradscope error')}")
    return f"::error {','.join(props)}::{_escape(text)}"


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
