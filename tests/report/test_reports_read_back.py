"""Every report any path writes reads back: ``gradscope show`` and ``--baseline`` take it, and
``Report.from_dict`` gives back the same JSON.

The writers are the real ones (the CLI, ``gradscope.watch(json=...)``, ``Report.save``, the Lightning
and Hugging Face callbacks, a DDP loop on gloo), each in the setting that adds fields to the report:
clipping, an fp16 grad scaler, a long run that keeps some steps, optional probes, a NaN.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Union

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

import gradscope
from gradscope.cli import app
from gradscope.report import Report
from gradscope.report_check import ReportError
from gradscope.reporters.json import load_report
from tests.conftest import config
from tests.trainer_setup import fresh_accelerate  # noqa: F401 (a fixture)

runner = CliRunner()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def own_loop(
    out: Path,
    steps: int = 4,
    clip: float | None = None,
    fp16: bool = False,
    nan_from: int | None = None,
    **watch: Any,
) -> Path:
    """A user's loop under ``gradscope.watch(json=out)``: SGD on a small MLP, as the README's example."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if fp16 else None
    x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 4
    with gradscope.watch(model, opt, scaler=scaler, json=str(out), **watch):
        for step in range(steps):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                inputs = x * math.nan if nan_from is not None and step >= nan_from else x
                loss = nn.functional.cross_entropy(model(inputs), y)
            if scaler is None:
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                scaler.step(opt)
                scaler.update()
    return out


def cli(out: Path, **top: Any) -> Path:
    """``gradscope inspect CONFIG --json out`` on a small MLP config (``top``: keys of the config)."""
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config(**{"steps": 2, **top})))
    result = runner.invoke(app, ["inspect", str(path), "--json", str(out)])
    assert result.exit_code in (0, 1), result.output
    return out


def saved(out: Path) -> Path:
    """``Report.save`` of a watched run's report, outside the block."""
    with gradscope.watch(mlp()) as scope:
        for _ in range(2):
            loss = mlp()(torch.randn(4, 8)).sum()
            loss.backward()
            scope.step(loss)
    scope.report.save(str(out))
    return out


def lightning(out: Path, **trainer: Any) -> Path:
    from gradscope.integrations.lightning import GradscopeCallback
    from tests.integrations.test_lightning import Regressor, fit

    fit(Regressor(), GradscopeCallback(json=str(out)), **trainer)
    return out


def hugging_face(out: Path, **args: Any) -> Path:
    from gradscope.integrations.transformers import GradscopeCallback
    from tests.integrations.test_transformers import gpt2, trainer

    trainer(out.parent, gpt2(), GradscopeCallback(json=str(out)), **args).train()
    return out


def ddp(out: Path, own_loop: bool = True) -> Path:
    """Two ranks on gloo: a user's DDP loop that clips under ``gradscope.watch``, or ``inspect --distributed ddp``."""
    from tests.observe.test_distributed import launch

    if own_loop:
        results = launch(["ddp", str(out)], module="tests.dist_watch")
    else:
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(config(steps=2, clip={"max_norm": 0.01})))
        results = launch(["inspect", str(path), "--distributed", "ddp", "--json", str(out)])
    assert all(code in (0, 1) for code, _, _ in results), [err[-2000:] for _, _, err in results]
    return out


WRITERS: dict[str, Callable[[Path], Path]] = {
    "inspect": cli,
    "inspect, clipped": lambda out: cli(out, clip={"max_norm": 0.01}),
    "inspect, fp16 scaler": lambda out: cli(out, precision="fp16", steps=3),
    "inspect, NaN": lambda out: cli(out, model="gradscope.faults:NanInForward", args={"width": 8, "classes": 4}),
    "watch": own_loop,
    "watch, clipped": lambda out: own_loop(out, clip=0.05),
    "watch, fp16 scaler, clipped": lambda out: own_loop(out, fp16=True, clip=0.05),
    "watch, long run kept in part, clipped": lambda out: own_loop(
        out, steps=120, clip=0.05, retention={"first": 4, "before": 2, "findings": 2, "sampled": 4, "every": 8}
    ),
    "watch, optional probe": lambda out: own_loop(out, probes=("update_ratio",)),
    "watch, NaN from step 2": lambda out: own_loop(out, steps=6, nan_from=2),
    "Report.save": saved,
    "Lightning": lightning,
    "Lightning, clipped": lambda out: lightning(out, gradient_clip_val=0.05),
    "Hugging Face, not clipped": lambda out: hugging_face(out, max_grad_norm=0.0),
    "Hugging Face, clipped": lambda out: hugging_face(out, max_grad_norm=0.01),
    "DDP": ddp,
    "inspect, DDP": lambda out: ddp(out, own_loop=False),
}


@pytest.mark.usefixtures("fresh_accelerate")
@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_written_report_reads_back(writer: str, tmp_path: Path) -> None:
    out = WRITERS[writer](tmp_path / "report.json")
    data = json.loads(out.read_text())
    report = Report.from_dict(data)
    assert report.to_dict() == data
    assert load_report(out).to_dict() == data  # what --baseline reads
    shown = runner.invoke(app, ["show", str(out)])
    errors = report.at_or_above("error")
    assert shown.exit_code == (1 if errors else 0), shown.output


def test_a_long_clipped_watched_run_is_a_baseline(tmp_path: Path) -> None:
    """``show`` and ``--baseline`` refused such a report: "retained: expected Retained, got {'kept': ...}"."""
    out = own_loop(tmp_path / "long.json", steps=40, clip=0.05, retention={"first": 4, "sampled": 4, "every": 8})
    assert json.loads(out.read_text())["retained"]["totals"]["clipped"]  # clipped steps listed: [step, norm, coef]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(steps=1)))
    result = runner.invoke(app, ["inspect", str(path), "--baseline", str(out)])
    assert result.exit_code in (0, 1), result.output


def test_a_field_deep_inside_is_named_when_wrong(tmp_path: Path) -> None:
    data = json.loads(own_loop(tmp_path / "r.json", steps=20, clip=0.05, retention={"first": 2}).read_text())
    data["retained"]["totals"]["clipped"][0][0] = "three"
    with pytest.raises(ReportError, match=r"retained\.totals\.clipped\[0\]\[0\]: expected an integer, got 'three'"):
        Report.from_dict(data)
    data["retained"]["totals"]["clipped"][0] = [1, 2.0]
    with pytest.raises(ReportError, match=r"retained\.totals\.clipped\[0\]: expected a list of 3"):
        Report.from_dict(data)


# --- the schema is the dataclasses: a report with every field filled reads back --------------------------


_COUNT = itertools.count(1)


def filled(hint: Any, depth: int = 0) -> Any:
    """A value of type ``hint`` that is no field's default (dataclasses with every field filled)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return hint(**{f.name: filled(hints[f.name], depth + 1) for f in dataclasses.fields(hint)})
    if origin in (Union, types.UnionType):
        return filled(next(a for a in args if a is not type(None)), depth)
    if origin is Literal:
        return args[-1]
    if origin is tuple:
        if args and args[-1] is not Ellipsis:
            return tuple(filled(a, depth) for a in args)
        return (filled(args[0], depth), filled(args[0], depth))
    if origin in (dict, Mapping):
        return {f"key{depth}": filled(args[1], depth + 1)}
    n = next(_COUNT)  # every value its own: elements keyed by their name stay apart
    return {int: n, float: -math.inf, str: f"text{n}", bool: True}.get(hint, [n + 0.5, "note"])  # the rest: Any


def test_a_report_with_every_field_filled_reads_back_equal() -> None:
    report = filled(Report)
    for obj in (report, report.run, report.steps[0], report.retained, report.retained.totals):
        defaults = [f.name for f in dataclasses.fields(obj) if getattr(obj, f.name) == f.default]
        assert defaults == []  # each field holds a value of its own
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    back = Report.from_dict(data)
    assert back == report and back.to_dict() == data
