"""A long watched run keeps a bounded number of full step records; the rules that look across steps
keep working from running totals; every step is streamed as JSON Lines."""

import gc
import json
import math

import pytest
import torch

import gradscope
from gradscope import zoo
from gradscope.history import History, Retention
from gradscope.report import Report, StepRecord
from tests import models

SMALL = Retention(first=4, before=2, findings=3, sampled=5, every=8)


@pytest.fixture(autouse=True)
def one_thread():
    # Thousands of tiny steps: one thread is faster than two that contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def live_records() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is StepRecord)


def run(model, steps: int, retention=SMALL, clip=None, poison=frozenset(), features: int = 16, **kw):
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, features), torch.randint(4, (8,))
    clipped = 0
    with gradscope.watch(model, optimizer=opt, activations=False, retention=retention, **kw) as scope:
        for step in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if step in poison:
                loss = loss * math.nan
            loss.backward()
            if clip is not None:
                total = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                clipped += bool(total > clip)
            scope.step(loss)
            if step in poison:
                continue  # no update from NaN gradients: the run goes on healthy
            opt.step()
    return scope, clipped


def test_a_long_run_keeps_at_most_the_bound_of_full_records():
    torch.manual_seed(0)
    model = zoo.MLP(in_features=16, hidden=8, depth=6, classes=4)  # 16 parameter tensors
    before = live_records()
    scope, _ = run(model, 600, poison={400})
    report = scope.report
    assert report.run.steps_completed == 600 and len(report.retained.series.step) == 600
    assert len(report.steps) <= SMALL.bound
    assert live_records() - before <= SMALL.bound + 1  # the records alive are the kept ones (and the last)
    kept = set(report.retained.kept)
    assert set(range(4)) <= kept and 599 in kept  # the first steps and the last
    assert {398, 399, 400} <= kept  # the NaN step and the run-up to it
    sampled = sorted(s for s in kept if s > 3 and s not in (398, 399, 400, 599))
    assert 1 <= len(sampled) <= SMALL.sampled and all(s % sampled[0] == 0 for s in sampled)
    (nan,) = [a for a in report.anomalies if a.kind.startswith("nonfinite")]
    assert nan.step == 400
    data = report.to_dict()
    assert data["retained"]["kept"] == [s.step for s in report.steps]
    assert data["retained"]["policy"] == {"first": 4, "before": 2, "findings": 3, "sampled": 5, "every": 8}
    assert Report.from_dict(json.loads(json.dumps(data))).to_dict() == data


def test_the_records_kept_do_not_grow_with_the_run():
    record = StepRecord(0, 1.0, 1.0, {}, {})
    history = History(SMALL)
    sizes = []
    for step in range(20_000):
        history.add(StepRecord(step, 1.0 + (step == 9000) * math.nan, 1.0, {}, {}) if step else record)
        if step in (1000, 5000, 19_999):
            sizes.append(len(history.steps()))
    assert max(sizes) <= SMALL.bound and sizes[-1] <= sizes[0] + SMALL.before + 1


def test_rules_across_steps_count_every_step_not_only_the_kept():
    model = models.WithUnused()
    scope, clipped = run(model, 200, clip=1e-3, features=8)
    report = scope.report
    assert len(report.steps) < 40
    kinds = {a.kind: a for a in report.anomalies}
    assert "unused_parameter" in kinds and "200 step(s)" in kinds["unused_parameter"].message
    clipping = kinds["gradient_clipping"]
    assert clipping.evidence["clipped_steps"] == clipped == 200
    assert f"clipping fires in {clipped} of 200 steps" in clipping.message


def test_a_stale_gradient_late_in_the_run_is_found_and_kept():
    torch.manual_seed(0)
    model = zoo.MLP(in_features=16, hidden=8, depth=2, classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 16), torch.randint(4, (8,))
    with gradscope.watch(model, optimizer=opt, activations=False, retention=SMALL) as scope:
        for step in range(200):
            if step != 150:  # forgot zero_grad once
                opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    (stale,) = [a for a in scope.report.anomalies if a.kind == "stale_gradient"]
    assert stale.step == 150 and 150 in scope.report.retained.kept


def test_jsonl_streams_every_step_in_full(tmp_path):
    torch.manual_seed(0)
    model = zoo.MLP(in_features=16, hidden=8, depth=2, classes=4)
    path = tmp_path / "steps.jsonl"
    scope, _ = run(model, 50, jsonl=str(path))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(50))
    assert len(scope.report.steps) < 50
    kept = {s.step: s for s in scope.report.steps}
    for line in lines:
        if line["step"] in kept:
            expected = kept[line["step"]]
            assert line["grad_norm_total"] == pytest.approx(expected.grad_norm_total)
            for name, stats in expected.parameters.items():
                assert line["parameters"][name]["grad_norm"] == pytest.approx(stats.grad_norm)
    series = scope.report.retained.series
    assert [line["loss"] for line in lines] == pytest.approx(list(series.loss))


def test_bad_retention_settings_say_which():
    with pytest.raises(ValueError, match=r"retention.every must be an integer >= 1, got 0"):
        gradscope.watch(torch.nn.Linear(2, 2), retention={"every": 0})


def test_inspect_streams_jsonl(tmp_path):
    from typer.testing import CliRunner

    from gradscope.cli import app

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: {target: gradscope.zoo:mlp, args: {in_features: 8, hidden: 8, depth: 2, classes: 4}}\n"
        "data: {batch_size: 8, input: {shape: [8]}, labels: {classes: 4}}\nsteps: 3\n"
    )
    out, lines = tmp_path / "r.json", tmp_path / "s.jsonl"
    result = CliRunner().invoke(app, ["inspect", str(cfg), "--json", str(out), "--jsonl", str(lines)])
    assert result.exit_code == 0, result.output
    streamed = [json.loads(line) for line in lines.read_text().splitlines()]
    assert streamed == json.loads(out.read_text())["steps"]
