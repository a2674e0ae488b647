"""The ``gradscope`` command: parses arguments, calls the library, maps outcomes to exit codes.

Exit codes: 0 clean, 1 findings at or above ``--fail-on``, 2 usage/config/model
error, 3 internal error, 130 interrupted. Results go to stdout, diagnostics to stderr.
"""

from __future__ import annotations

import enum
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from gradscope.cli.help import EXIT_CODES, Command
from gradscope.config import Settings, load_config
from gradscope.config.checks import parse_check_options
from gradscope.errors import (
    EXIT_FINDINGS,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    GradscopeError,
    ModelError,
)
from gradscope.report import Anomaly
from gradscope.report.memory import parse_bytes
from gradscope.reporters import Outputs, Reporters, build_reporters
from gradscope.reporters.ci import error_command
from gradscope.reporters.json import load_report
from gradscope.reporters.plot import image_format
from gradscope.reporters.terminal import print_verdict
from gradscope.rules.consequences import consequence
from gradscope.utils import outfiles
from gradscope.utils.interrupts import Interrupts
from gradscope.utils.piping import user_stdout
from gradscope.version import __version__

if TYPE_CHECKING:
    from gradscope.runner.inspection import Inspection

app = typer.Typer(
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: rich's shows `<bool>` after every flag
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    help="Gradient diagnostics for PyTorch models.",
    epilog=EXIT_CODES,
)


class Strategy(str, enum.Enum):
    none = "none"
    ddp = "ddp"
    fsdp = "fsdp"


class FailOn(str, enum.Enum):
    error = "error"
    warning = "warning"
    info = "info"
    never = "never"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gradscope {__version__}")
        raise typer.Exit()


# Options both commands take.
ShowAll = Annotated[bool, typer.Option("--all", help="Show every parameter row in the table.")]
Plot = Annotated[
    str | None, typer.Option("--plot", metavar="PATH.png", help="Save the gradient-flow picture (needs matplotlib).")
]
FailOnOption = Annotated[
    FailOn,
    typer.Option(
        "--fail-on",
        metavar="LEVEL",
        help="Exit 1 when a finding is at least this severe: error, warning, info or never.",
    ),
]
Verbose = Annotated[bool, typer.Option("-v", "--verbose", help="Show tracebacks for errors.")]


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Gradient diagnostics for PyTorch models."""


@app.command(cls=Command, epilog=EXIT_CODES, short_help="Run a config's model and report its gradients.")
def inspect(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="The YAML config to run.", show_default=False)],
    json_path: Annotated[
        str | None, typer.Option("--json", metavar="PATH", help="Write the JSON report here ('-' for stdout).")
    ] = None,
    jsonl: Annotated[
        str | None, typer.Option("--jsonl", metavar="PATH", help="Stream every step's record here, one JSON line each.")
    ] = None,
    csv: Annotated[
        str | None, typer.Option("--csv", metavar="PATH", help="Write per-step per-parameter statistics as CSV.")
    ] = None,
    show_all: ShowAll = False,
    plot: Plot = None,
    fail_on: FailOnOption = FailOn.error,
    logdir: Annotated[str | None, typer.Option("--logdir", metavar="DIR", help="Write a TensorBoard run here.")] = None,
    baseline: Annotated[
        Path | None,
        typer.Option("--baseline", metavar="BASE.json", help="Compare per-layer gradient norms with a saved report."),
    ] = None,
    update_baseline: Annotated[
        bool, typer.Option("--update-baseline", help="Write this run's report to --baseline instead of comparing.")
    ] = False,
    junit: Annotated[
        str | None, typer.Option("--junit", metavar="PATH", help="Write JUnit XML, one test case per check.")
    ] = None,
    check: Annotated[
        list[str] | None,
        typer.Option(
            "--check", metavar="KIND.KEY=VALUE", help="Override a check's threshold, e.g. dead_relu.fraction=0.3."
        ),
    ] = None,
    gradcheck: Annotated[
        bool, typer.Option("--gradcheck", help="Check custom autograd.Functions against finite differences.")
    ] = False,
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, metavar="N", help="Override the config's `steps`.")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", metavar="DEVICE", help="Override the config's `device` (cpu, cuda:1, ...)."),
    ] = None,
    strategy: Annotated[
        Strategy | None,
        typer.Option(
            "--distributed",
            metavar="STRATEGY",
            help="Run under torchrun with none, ddp or fsdp (overrides the config's `distributed.strategy`).",
        ),
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option(
            "--memory-budget",
            metavar="SIZE",
            help="Fail a run whose parameters, gradients, optimizer state and saved activations exceed "
            "SIZE (512MiB, 6GB, 6GiB), and say which modules to checkpoint to fit it.",
        ),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Run a config's model through instrumented forward/backward passes and report its gradients.

    Under torchrun (torchrun --nproc_per_node=N -m gradscope inspect CONFIG --distributed ddp)
    every rank runs its slice of the batch and rank 0 writes the reports.
    """
    written = str(baseline) if update_baseline and baseline is not None else None
    files = {"--json": json_path, "--jsonl": jsonl, "--csv": csv, "--junit": junit, "--plot": plot}
    files["--update-baseline"] = written
    piped = any(outfiles.is_stdout(path) for path in files.values())  # a report goes to stdout: nothing else may
    with Interrupts() as interrupts:  # SIGINT and SIGTERM, restored when the command ends
        try:
            overrides = _overrides(steps, device, gradcheck, check or [], logdir, strategy, memory_budget)
            inspection = _prepare(config, overrides, baseline, update_baseline, files, logdir, piped)
        except KeyboardInterrupt:
            print(f"{_name()}: interrupted before the first step; nothing was measured", file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except GradscopeError as exc:
            raise typer.Exit(_fail(exc, verbose, EXIT_USAGE)) from None
        except Exception as exc:  # a bug of ours, not the user's
            raise typer.Exit(_fail(exc, verbose, EXIT_INTERNAL)) from None
        reporters = _reporters(inspection, files, show_all, fail_on.value, verbose)
        code = _finish(inspection, reporters, fail_on.value, verbose, interrupts, piped)
        if reporters:
            outputs = [*files.values(), inspection.settings.tensorboard.logdir]
            _conclude(inspection, code, fail_on.value, outputs, piped)
        if inspection.ranks is not None:
            # Everything is written and the process group is gone; gloo's worker threads can still abort
            # the interpreter's shutdown (SIGABRT as they release tensors), turning a finished run into a crash.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise typer.Exit(code)


def _prepare(
    config: Path,
    overrides: dict[str, Any],
    baseline: Path | None,
    update_baseline: bool,
    files: dict[str, str | None],
    logdir: str | None,
    piped: bool,
) -> Inspection:
    """The config read and checked with its outputs and baseline, then the model and batch built."""
    if update_baseline and baseline is None:
        raise ConfigError([("--update-baseline", "needs --baseline PATH to write to")])
    if baseline is not None and not update_baseline and not baseline.exists():
        raise ConfigError([("--baseline", f"{baseline} does not exist: write it first with --update-baseline")])
    saved = load_report(baseline) if baseline is not None and not update_baseline else None
    settings = load_config(config, overrides)
    _check_outputs(files, logdir, settings, config)
    from gradscope.runner import fit  # torch: only once a config is valid

    for key, text in fit.advice(settings):
        print(f"{_name()}: warning: {fit.where(settings, key)}{key}: {text}", file=sys.stderr)
    with user_stdout(piped):
        from gradscope.runner.inspection import Inspection  # torch: only once a config is valid

        return Inspection(settings, saved)


def _reporters(
    inspection: Inspection, files: dict[str, str | None], show_all: bool, fail_on: str, verbose: bool
) -> Reporters:
    """The run's reporters; one that cannot be made ends the command (exit 2, or 3 for a bug)."""
    try:
        wanted = _outputs(files, show_all, fail_on, inspection)
        return build_reporters(wanted, inspection.ranks.rank if inspection.ranks is not None else None)
    except GradscopeError as exc:
        inspection.close()
        raise typer.Exit(_fail(exc, verbose, EXIT_USAGE)) from None
    except Exception as exc:
        inspection.close()
        raise typer.Exit(_fail(exc, verbose, EXIT_INTERNAL)) from None


def _conclude(inspection: Inspection, code: int, fail_on: str, outputs: list[str | None], piped: bool) -> None:
    """The files written and the one-line verdict, printed after everything else."""
    try:
        report = inspection.report()
    except Exception:  # the report could not be built: the error above is the last word
        return
    if not report.steps:
        return  # nothing was measured: the error on stderr is the whole story
    print_verdict(sys.stderr if piped else sys.stdout, report, code, fail_on, outputs)


def _finish(
    inspection: Inspection,
    reporters: Reporters,
    fail_on: str,
    verbose: bool,
    interrupts: Interrupts,
    piped: bool,
) -> int:
    """Run and report; the exit code, the same on every rank of a distributed run that completed."""
    try:
        code = _run(inspection, reporters, verbose, interrupts, piped)
        if code is not None:
            return code  # a rank that stops early does not wait for the others
        code = EXIT_FINDINGS if inspection.report().at_or_above(fail_on) else EXIT_OK
        return inspection.ranks.agree(code) if inspection.ranks is not None else code
    finally:
        inspection.close()


@app.command(cls=Command, epilog=EXIT_CODES)
def show(
    report_path: Annotated[Path, typer.Argument(metavar="REPORT.json", help="A report written by --json.")],
    show_all: ShowAll = False,
    plot: Plot = None,
    fail_on: FailOnOption = FailOn.error,
    verbose: Verbose = False,
) -> None:
    """Render a saved JSON report again, without rerunning the model."""
    try:
        report = load_report(report_path)
        if plot is not None:
            outfiles.check_file("--plot", plot, [report_path])
        reporters = build_reporters(Outputs(terminal=sys.stdout, show_all=show_all, plot=plot))
        reporters.write(report)
    except GradscopeError as exc:
        raise typer.Exit(_fail(exc, verbose, EXIT_USAGE)) from None
    code = EXIT_FINDINGS if report.at_or_above(fail_on.value) else EXIT_OK
    print_verdict(sys.stdout, report, code, fail_on.value, [plot])
    raise typer.Exit(code)


def _run(
    inspection: Inspection, reporters: Reporters, verbose: bool, interrupts: Interrupts, piped: bool
) -> int | None:
    """Run, then write the report whatever happened; an exit code if the run did not complete."""
    code = None
    try:
        with user_stdout(piped):
            inspection.run(on_step=reporters.on_step)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        print(f"{_name()}: interrupted; writing the steps measured so far", file=sys.stderr)
    except GradscopeError as exc:
        cause = consequence(inspection.report()) if isinstance(exc, ModelError) else None
        code = _consequence(exc, cause, verbose) if cause is not None else _fail(exc, verbose, EXIT_USAGE)
    except Exception as exc:
        code = _fail(exc, verbose, EXIT_INTERNAL)
    interrupts.hold()  # a second Ctrl-C or SIGTERM waits for the report to be written
    try:
        reporters.write(inspection.report())
    except GradscopeError as exc:  # an output failed at the end (disk full, folder removed): the others are written
        return _fail(exc, verbose, EXIT_USAGE)
    except Exception as exc:
        return _fail(exc, verbose, EXIT_INTERNAL)
    return code


def _check_outputs(files: dict[str, str | None], logdir: str | None, settings: Settings, config: Path) -> None:
    """Every output (``files``: option -> path) is checked before the run starts, so that no run ends
    in an unwritable path; none may overwrite the config."""
    outfiles.check_files(files, [config])
    if files["--plot"] is not None:
        image_format(files["--plot"])
    folder = settings.tensorboard.logdir
    option = "--logdir" if logdir is not None else "tensorboard.logdir"
    if folder is not None:
        outfiles.check_folder(option, folder)
    outfiles.check_distinct({**files, option: folder})


def _outputs(files: dict[str, str | None], show_all: bool, fail_on: str, inspection: Inspection) -> Outputs:
    settings = inspection.settings
    logdir = settings.tensorboard.logdir
    return Outputs(
        # With a report on stdout, the human-readable one moves to stderr.
        terminal=sys.stderr if any(outfiles.is_stdout(path) for path in files.values()) else sys.stdout,
        show_all=show_all,
        plot=files["--plot"],
        json=files["--json"],
        jsonl=files["--jsonl"],
        csv=files["--csv"],
        junit=files["--junit"],
        baseline=files["--update-baseline"],
        fail_on=fail_on,
        logdir=logdir,
        config_text=yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False) if logdir else None,
        github=os.environ.get("GITHUB_ACTIONS") == "true",
        config_source=settings.origin.source,
        progress=settings.steps if sys.stderr.isatty() else None,  # a log file gets no progress line
        compared=inspection.baseline is not None,
        checks=settings.checks,
    )


def _overrides(
    steps: int | None,
    device: str | None,
    gradcheck: bool,
    checks: list[str],
    logdir: str | None,
    strategy: Strategy | None,
    memory_budget: str | None = None,
) -> dict[str, Any]:
    """Config keys the command line sets; ``load_config`` merges mappings into the file's sections."""
    out: dict[str, Any] = {k: v for k, v in (("steps", steps), ("device", device)) if v is not None}
    if memory_budget is not None:
        try:
            parse_bytes(memory_budget)
        except ValueError as exc:
            raise ConfigError([("--memory-budget", str(exc))]) from None
        out["memory"] = {"budget": memory_budget}
    if strategy is not None:
        out["distributed"] = {"strategy": strategy.value}
    if gradcheck:
        out["gradcheck"] = True
    if logdir is not None:
        out["tensorboard"] = {"logdir": logdir}
    if checks:
        out["checks"] = parse_check_options(checks)
    return out


def _fail(exc: BaseException, verbose: bool, code: int) -> int:
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    name = _name()
    if code == EXIT_USAGE and os.environ.get("GITHUB_ACTIONS") == "true":
        print(error_command(exc), file=sys.stderr)  # annotated at the user's line
    if code == EXIT_INTERNAL:
        print(f"{name}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("this is a bug in gradscope; rerun with -v for the traceback and report it", file=sys.stderr)
    else:
        print(f"{name}: error: {exc}", file=sys.stderr)
        if not verbose:
            print("(rerun with -v for the full traceback)", file=sys.stderr)
    return code


def _consequence(exc: BaseException, cause: Anomaly, verbose: bool) -> int:
    """The run raised on the NaN/Inf an earlier finding wrote into the weights: a finding's
    consequence (exit 1), not the user's code failing on its own (exit 2)."""
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    step = cause.evidence["consequence"]["step"]
    print(
        f"{_name()}: step {step} raised, a consequence of {cause.kind} at step {cause.step} (see the findings): {exc}",
        file=sys.stderr,
    )
    return EXIT_FINDINGS


def _name() -> str:
    """``gradscope``, or ``gradscope[rank N]`` in one of several processes under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"gradscope[rank {os.environ.get('RANK', '?')}]" if world > 1 else "gradscope"


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    finally:
        # Everything is written; a Ctrl-C now would only interrupt the interpreter's shutdown
        # (a second Ctrl-C there once aborted with "Fatal Python error ... finalizing").
        signal.signal(signal.SIGINT, signal.SIG_IGN)
