"""The README's own-loop example without scope.step(loss): the loss comes from the backward the watch
observes, and the watch says its findings on the ``gradscope`` logger as they appear."""

import logging
import math

import torch
from torch import nn

import gradscope
from gradscope.reporters import Outputs, build_reporters
from gradscope.reporters.logs import LogReporter, summary_line
from tests.probes.test_syncs import count_syncs
from tests.reporters.test_tensorboard import events, scalars


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def batches(n: int, nan_at: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        x = torch.randn(16, 8, generator=gen)
        if i == nan_at:
            x[3, 2] = math.nan
        out.append((x, torch.randint(0, 2, (16,), generator=gen)))
    return out


def test_the_plain_loop_records_each_steps_loss_and_tensorboard_gets_it(tmp_path):
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seen = []
    with gradscope.watch(model, opt, logdir=str(tmp_path / "tb"), quiet=True) as scope:
        for x, y in batches(6):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            seen.append(loss.item())
    assert [s.loss for s in scope.report.steps] == seen  # float32 losses, copied exactly
    logged = scalars(events(tmp_path / "tb"), "loss")
    assert [logged[i] for i in range(6)] == [float(torch.tensor(v)) for v in seen]


def test_micro_batch_losses_sum_to_the_loss_of_the_step_and_a_given_loss_wins():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected, given = [], []
    with gradscope.watch(model, opt, quiet=True) as scope:
        for i, (x, y) in enumerate(batches(8)):
            loss = nn.functional.cross_entropy(model(x), y) / 2
            loss.backward()
            if i % 2 == 0:
                first = loss.detach()
                continue
            expected.append((first + loss.detach()).item())
            if i == 7:
                scope.step(torch.tensor(123.0))  # what the loop says wins over what it backpropagated
                given.append(123.0)
            opt.step()
            opt.zero_grad()
    assert [s.loss for s in scope.report.steps] == expected[:3] + given


def test_a_grad_scalers_loss_is_taken_before_the_scaling():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    seen = []
    with gradscope.watch(model, opt, scaler=scaler, quiet=True) as scope:
        for x, y in batches(3):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            seen.append(loss.item())
    assert [s.loss for s in scope.report.steps] == seen
    assert scope.report.steps[0].loss_scale == 1024.0


def test_still_one_host_transfer_per_step_and_none_when_the_block_closes(monkeypatch):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # Adam's own step syncs (step.item())
    data = batches(5)
    calls = count_syncs(monkeypatch)
    with gradscope.watch(model, opt, quiet=True, activations=False):
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert calls == ["tolist"] * 5  # the sampled movement of each update joins the next step's transfer


def test_a_nan_is_said_at_its_step_once_and_the_exit_says_a_summary(caplog):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    heard_at = {}
    with caplog.at_level(logging.INFO, logger="gradscope"):
        with gradscope.watch(model, opt) as scope:
            for i, (x, y) in enumerate(batches(6, nan_at=2)):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                heard_at[i] = len(caplog.records)
    records = [r for r in caplog.records if r.name == "gradscope"]
    assert heard_at[1] == 0 and heard_at[2] == 1  # said at the step that made it, not before
    first = records[0]
    assert first.levelno == logging.ERROR and first.getMessage().startswith("gradscope: step 2: error nonfinite_")
    assert "x" in first.getMessage() or "input" in first.getMessage()
    kinds = {a.kind for a in scope.report.at_or_above("warning")}
    said = [r.getMessage() for r in records[:-1]]
    assert len(said) == len(kinds) and all(any(f" {k}" in m for m in said) for k in kinds)  # each kind once
    last = records[-1].getMessage()
    assert last == summary_line(scope.report) and last.startswith("gradscope: 6 steps watched,")


def test_quiet_says_nothing_and_a_healthy_loop_says_only_an_info_summary(caplog):
    with caplog.at_level(logging.DEBUG, logger="gradscope"):
        for quiet in (True, False):
            model = net()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            with gradscope.watch(model, opt, quiet=quiet):
                for x, y in batches(4):
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x), y).backward()
                    opt.step()
    (record,) = [r for r in caplog.records if r.name == "gradscope"]
    assert (
        record.levelno == logging.INFO and record.getMessage() == "gradscope: 4 steps watched, no warnings or errors."
    )


def test_only_rank_zero_speaks_and_only_when_asked():
    said = []
    speaking = Outputs(speak=True, say=lambda level, text: said.append(text))
    assert build_reporters(speaking, rank=1).reporters == []
    (reporter,) = build_reporters(speaking, rank=0).reporters
    assert isinstance(reporter, LogReporter) and build_reporters(Outputs(), rank=0).reporters == []
