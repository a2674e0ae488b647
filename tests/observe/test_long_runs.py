"""A long run reads right: its step table and its layer x step heat map put each step recorded in
full where it is, name the steps between them, and show a NaN that persists as one row.

The runs are real loops of 300 steps (``gradscope.watch``, Lightning; 100 of the Hugging Face Trainer),
whose default retention keeps only some steps in full; each step's gradients are taken
independently from ``.grad`` as the optimizer gets them.
"""

from __future__ import annotations

import io
import math
import re

import numpy
import pytest
import torch
from torch import nn
from transformers import TrainerCallback

import gradscope
from gradscope.history import Retention
from gradscope.report import Report
from gradscope.reporters.cells import num
from gradscope.reporters.plot import figure
from gradscope.reporters.terminal import TerminalReporter
from tests.conftest import norm64
from tests.trainer_setup import fresh_accelerate  # noqa: F401 (a fixture)

matplotlib = pytest.importorskip("matplotlib")
STEPS = 300


@pytest.fixture(autouse=True)
def close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def own_loop(nan_steps: range = range(0)) -> tuple[Report, list[dict[str, float]]]:
    """300 steps of a user's fp16 loop with a grad scaler; the batch holds NaN at ``nan_steps`` (the
    scaler skips those updates, so the run recovers). Each step's gradients as the optimizer gets them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, backoff_factor=0.9)
    x, y = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 4
    norms = []
    with gradscope.watch(model, opt, scaler=scaler) as scope:
        for step in range(STEPS):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x * math.nan if step in nan_steps else x), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            norms.append({n: norm64(p.grad) for n, p in model.named_parameters()})
            scaler.step(opt)
            scaler.update()
    return scope.report, norms


class Reference(TrainerCallback):
    """The gradients as the Hugging Face Trainer hands them to the optimizer."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: norm64(p.grad) for n, p in model.named_parameters() if p.grad is not None})


def lightning() -> tuple[Report, list[dict[str, float]]]:
    from gradscope.integrations.lightning import GradscopeCallback
    from tests.integrations.test_lightning import Reference as LightningReference
    from tests.integrations.test_lightning import Regressor, fit

    callback, reference = GradscopeCallback(), LightningReference()
    fit(Regressor(), callback, reference, epochs=STEPS // 4)  # 4 batches an epoch
    return callback.report, reference.steps


def hugging_face(tmp_path) -> tuple[Report, list[dict[str, float]]]:
    from gradscope.integrations.transformers import GradscopeCallback
    from tests.integrations.test_transformers import gpt2, trainer

    callback, reference = GradscopeCallback(), Reference()
    # 100 steps, past the first sampled one (64): the Trainer takes ~0.1 s a step on a CPU
    trainer(tmp_path, gpt2(), callback, reference, max_steps=100, max_grad_norm=0.0, logging_steps=50).train()
    return callback.report, reference.steps


def table(report: Report) -> list[list[str]]:
    """The step table's title and rows (cells split on runs of spaces)."""
    out = io.StringIO()
    TerminalReporter(out).write(report)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("per step"))
    end = next(i for i, line in enumerate(lines) if i > start and ("─" in line or line.startswith("no anomalies")))
    header = next(i for i in range(start, end) if lines[i].split()[:1] == ["step"])
    return [[" ".join(lines[start:header])]] + [re.split(r"\s{2,}", line.strip()) for line in lines[header + 1 : end]]


def heat_cells(report: Report) -> tuple[list[str], list[tuple[float, float, list[float | None]]]]:
    """The heat map's layers, and its cells: (left x, right x, value per layer; None where masked: NaN/Inf)."""
    fig = figure(report)
    heat = next(ax for ax in fig.axes if ax.get_title().startswith("gradient norm per layer and step"))
    layers = [t.get_text() for t in heat.get_yticklabels()]
    cells = []
    for mesh in heat.collections:
        coords = mesh.get_coordinates()  # (layers + 1, columns + 1, 2)
        values = mesh.get_array().reshape(coords.shape[0] - 1, coords.shape[1] - 1)
        mask = numpy.ma.getmaskarray(values)
        for j in range(values.shape[1]):
            column = [None if mask[i, j] else float(values[i, j]) for i in range(len(layers))]
            cells.append((float(coords[0, j, 0]), float(coords[0, j + 1, 0]), column))
    return layers, cells


def assert_steps_where_they_are(report: Report, norms: list[dict[str, float]]) -> None:
    """The table's rows and the heat map's cells sit at the steps they stand for, with those steps' numbers."""
    kept, steps = [s.step for s in report.steps], len(norms)
    assert report.retained is not None and len(report.retained.series.step) == steps
    retention = Retention(**report.retained.policy)
    assert set(range(retention.first)) | {steps - 1} <= set(kept) and len(kept) < steps
    title, *rows = table(report)
    assert f"{len(kept)} of {steps} steps recorded in full (the first {retention.first}," in title[0]
    spans = [(int(row[0].split("-")[0]), int(row[0].split("-")[-1]), row) for row in rows]
    assert [s for first, last, _ in spans for s in range(first, last + 1)] == list(range(steps))  # each step once
    for first, last, row in spans:
        count, hidden = last - first + 1, sum(1 for s in kept if first <= s <= last)
        if "not shown" in row[-1] or "not recorded" in row[-1]:  # a gap: how many steps, and why left out
            assert row[-1].startswith(f"{count} step")
            assert (f"{hidden} not shown" in row[-1] or row[-1].endswith("not shown")) == (hidden > 0)
            assert ("not recorded in full" in row[-1]) == (hidden < count)
        else:  # a step, or steps alike: recorded in full, the first one's total norm shown
            assert hidden == count and ("alike" in row[-1]) == (count > 1)
            assert row[2] == num(math.sqrt(sum(v * v for v in norms[first].values()))), row
    layers, cells = heat_cells(report)
    for step in range(steps):
        inside = [values for left, right, values in cells if left < step < right]
        if step not in kept:
            assert inside == [], step  # a step not recorded is drawn nowhere
            continue
        (values,) = inside
        expected = [norms[step][name] for name in layers]
        assert [v is None for v in values] == [math.isnan(e) for e in expected], step  # NaN/Inf: the "bad" colour
        drawn = [v for v, e in zip(values, expected) if e > 0 and math.isfinite(e)]
        assert drawn == pytest.approx([math.log10(e) for e in expected if e > 0 and math.isfinite(e)], rel=1e-4)


def test_a_watched_long_run_with_a_nan_for_60_steps_reads_right():
    report, norms = own_loop(nan_steps=range(120, 180))
    assert all(math.isnan(norms[s]["0.weight"]) for s in range(120, 180))  # the NaN is real, every step
    assert_steps_where_they_are(report, norms)
    title, *rows = table(report)
    stride = report.retained.stride
    sampled = [s.step for s in report.steps if s.step >= Retention().first and s.step % stride == 0]
    assert sampled and f"{len(sampled)} sampled, one every {stride} steps," in title[0]
    (alike,) = [r for r in rows if "alike" in r[-1]]  # the 60 NaN steps: one row
    assert alike[0] == "120-179" and alike[-1] == "60 steps alike: loss NaN, grad norm NaN, update skipped"


def test_a_lightning_long_runs_table_and_heat_map_put_steps_where_they_are():
    assert_steps_where_they_are(*lightning())


@pytest.mark.usefixtures("fresh_accelerate")
def test_a_hugging_face_long_runs_table_and_heat_map_put_steps_where_they_are(tmp_path):
    assert_steps_where_they_are(*hugging_face(tmp_path))
