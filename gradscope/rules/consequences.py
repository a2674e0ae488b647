"""A run that raised because an earlier finding's NaN/Inf reached the weights: the raise is that
finding's consequence (``torch.distributions`` refusing NaN logits, ``linalg.eigh`` failing to
converge on a NaN matrix), and the finding says so rather than standing beside a second fault."""

from __future__ import annotations

from dataclasses import replace

from gradscope.report import Anomaly, Report

ERROR_CHARS = 160  # of the raise's message, in the finding (the full text is the run's error)


def raised_after(report: Report, found: list[Anomaly]) -> list[Anomaly]:
    """The earliest NaN/Inf finding before the step that raised, told that the raise followed from it."""
    run = report.run
    if run.status != "failed" or not run.nonfinite_parameters or not run.error:
        return found
    failed_at = report.steps[-1].step + 1 if report.steps else run.steps_completed
    causes = [a for a in found if a.kind.startswith("nonfinite") and a.step is not None and a.step < failed_at]
    if not causes:
        return found
    cause = min(causes, key=lambda a: a.step)  # type: ignore[arg-type, return-value]
    names = run.nonfinite_parameters
    listed = ", ".join(names[:4]) + ("..." if len(names) > 4 else "")
    error = " ".join(run.error.split())
    error = error if len(error) <= ERROR_CHARS else error[: ERROR_CHARS - 3] + "..."
    updates = f"step {cause.step}'s update" if failed_at == cause.step + 1 else f"the updates from step {cause.step} on"
    text = (
        f" {updates[0].upper() + updates[1:]} wrote NaN/Inf into {len(names)} parameter(s) ({listed}), and step {failed_at} then "
        f"raised on them: {error}. That raise is this finding's consequence, not a second fault: fix this one."
    )
    evidence = {**cause.evidence, "consequence": {"step": failed_at, "error": run.error, "parameters": list(names)}}
    linked = replace(cause, message=cause.message + text, evidence=evidence)
    return [linked if a is cause else a for a in found]


def consequence(report: Report) -> Anomaly | None:
    """The finding whose consequence the run's raise was, if any."""
    return next((a for a in report.anomalies if "consequence" in a.evidence), None)
