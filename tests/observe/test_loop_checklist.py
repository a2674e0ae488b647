"""The "loss not decreasing" checklist inside gradscope.watch: each loop bug with its cause and fix,
and a healthy twin that must stay quiet. Whether weights moved is checked independently, on copies
of the parameters taken by the test before and after the loop."""

import copy

import pytest
import torch
from torch import nn

import gradscope


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))


def batches(n: int = 40) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 8, generator=gen), torch.randint(0, 2, (32,), generator=gen)) for _ in range(n)]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def plain_loop(model: nn.Module, opt: torch.optim.Optimizer, n: int = 40, **watch_args) -> gradscope.Report:
    with gradscope.watch(model, opt, quiet=True, **watch_args) as scope:
        for x, y in batches(n):
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
    return scope.report


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def unchanged(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if torch.equal(before[n], p.detach())}


def loud(report: gradscope.Report) -> dict[str, list]:
    """The findings at warning or error, by kind."""
    out: dict[str, list] = {}
    for a in report.at_or_above("warning"):
        out.setdefault(a.kind, []).append(a)
    return out


# --- parameters in no optimizer param group ---------------------------------------------------------


def test_a_head_replaced_after_the_optimizer_was_built_is_named_not_called_a_missing_zero_grad():
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model[4] = nn.Linear(16, 2)  # the optimizer holds the old head
    before = weights(model)
    report = plain_loop(model, opt)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    outside = {n for n, p in model.named_parameters() if id(p) not in held}
    found = loud(report)
    assert set(found) == {"not_in_optimizer"}  # not stale_gradient's "call zero_grad"
    (a,) = found["not_in_optimizer"]
    assert a.severity == "warning" and set(a.evidence["parameters"]) == outside == {"4.weight", "4.bias"}
    assert "built before they were created or replaced" in a.message and "add_param_group" in a.message
    assert unchanged(before, model) == outside  # the head alone never moved


def test_an_optimizer_over_another_copy_of_the_model_is_an_error_nothing_trains():
    model = net()
    opt = torch.optim.AdamW(copy.deepcopy(model).parameters(), lr=1e-2)
    before = weights(model)
    found = loud(plain_loop(model, opt))
    assert found["not_in_optimizer"][0].severity == "error"
    assert "nothing trains" in found["not_in_optimizer"][0].message
    assert unchanged(before, model) == set(before)


def test_a_frozen_backbone_the_optimizer_does_not_hold_is_not_a_finding():
    model = net()
    for p in model[:2].parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = weights(model)
    assert loud(plain_loop(model, opt)) == {}
    assert unchanged(before, model) == {"0.weight", "0.bias", "1.weight", "1.bias"}


# --- the optimizer steps but the weights do not move --------------------------------------------------


def test_a_learning_rate_of_zero_in_every_group_is_an_error_that_names_the_schedule():
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)  # a schedule that yields 0
    before = weights(model)
    with gradscope.watch(model, opt, quiet=True) as scope:
        for x, y in batches():
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
            schedule.step()
    assert unchanged(before, model) == set(before)
    (a,) = loud(scope.report)["no_update"]
    assert a.severity == "error" and a.evidence["cause"] == "lr_zero" and a.evidence["count"] == 40
    assert a.evidence["unmoved_steps"] == a.evidence["moved_checked"] == 39  # the last update is not read
    assert "learning rate is 0 in every param group at 40 of 40" in a.message


def test_a_warm_up_that_starts_at_zero_is_not_a_finding():
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 5))  # lr 0 at the first step
    moved_at: list[bool] = []
    with gradscope.watch(model, opt, quiet=True) as scope:
        for x, y in batches():
            opt.zero_grad()
            loss_of(model, x, y).backward()
            before = model[0].weight.detach().clone()
            opt.step()
            moved_at.append(not torch.equal(before, model[0].weight))
            schedule.step()
    loop = scope.report.run.loop
    assert moved_at[0] is False and all(moved_at[1:])  # independent: only the first update is zero
    assert (loop.lr_zero_steps, loop.lr_zero_first, loop.unmoved_steps, loop.moved_checked) == (1, 0, 1, 39)
    assert loud(scope.report) == {}


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_between_backward_and_step_is_named_as_such(set_to_none):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = weights(model)
    with gradscope.watch(model, opt, quiet=True) as scope:
        for x, y in batches():
            loss_of(model, x, y).backward()
            opt.zero_grad(set_to_none=set_to_none)
            opt.step()
    assert unchanged(before, model) == set(before)  # SGD without momentum: zero or absent gradients move nothing
    found = loud(scope.report)
    assert set(found) == {"no_update"}  # not unused_parameter, zero_gradient or gradient_clipping
    (a,) = found["no_update"]
    assert a.severity == "error" and a.evidence["cause"] == "cleared"
    assert "between backward() and optimizer.step() at 40 of 40" in a.message
    assert ("zero_grad(set_to_none=False)" in a.message) is (not set_to_none)
    assert all(s.clip_coefficient is None for s in scope.report.steps)


def test_a_learning_rate_too_small_to_change_a_weight_is_an_update_that_moved_nothing():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-30)  # a mis-typed exponent: lr x grad rounds away in float32
    before = weights(model)
    report = plain_loop(model, opt, n=10)
    # Independent: only BatchNorm's bias moved, from 0, where even a step of 1e-30 is representable.
    assert set(before) - unchanged(before, model) == {"1.bias"}
    found = loud(report)
    assert set(found) == {"no_update"}
    (a,) = found["no_update"]
    assert (a.severity, a.evidence["cause"], a.evidence["unmoved_steps"]) == ("error", "unmoved", 9)
    assert "lr 1e-30 in the first group" in a.message and "too small to change the weights" in a.message


def test_accumulation_done_right_is_not_a_finding():
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with gradscope.watch(model, opt, quiet=True) as scope:
        for i, (x, y) in enumerate(batches()):
            (loss_of(model, x, y) / 4).backward()
            if i % 4 == 3:
                opt.step()
                opt.zero_grad()
    assert loud(scope.report) == {}
    assert scope.report.run.loop.backwards == 40 and scope.report.run.loop.updates == 10


def test_a_forgotten_backward_leaves_no_gradient_at_the_step():
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = weights(model)
    with gradscope.watch(model, opt, quiet=True) as scope:
        for x, y in batches(10):
            opt.zero_grad()
            loss_of(model, x, y)  # backward() forgotten
            opt.step()
    assert unchanged(before, model) == set(before)
    found = loud(scope.report)
    assert set(found) == {"no_update"}  # not unused_parameter on every layer: no backward ran at all
    (a,) = found["no_update"]
    assert a.evidence["cause"] == "no_gradient" and a.severity == "error"
    assert "ran before backward()" in a.message


def test_gradients_cleared_on_part_of_the_model_name_those_parameters_as_a_warning():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = weights(model)
    with gradscope.watch(model, opt, quiet=True) as scope:
        for x, y in batches(10):
            opt.zero_grad()
            loss_of(model, x, y).backward()
            for p in model[0].parameters():
                p.grad = None  # the first layer kept fixed by clearing its gradient
            opt.step()
    assert unchanged(before, model) == {"0.weight", "0.bias"}  # independent: the rest trains
    found = loud(scope.report)
    assert set(found) == {"no_update"}
    (a,) = found["no_update"]
    assert (a.severity, a.evidence["cause"], a.evidence["parameters"]) == (
        "warning",
        "cleared_part",
        ["0.weight", "0.bias"],
    )
    assert "at 10 of 10 steps (0.weight, 0.bias; set to None)" in a.message and "Nothing trains" not in a.message


def test_zero_grad_after_scope_step_and_before_optimizer_step_is_still_named():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = weights(model)
    with gradscope.watch(model, opt, quiet=True) as scope:
        for x, y in batches(10):
            loss_of(model, x, y).backward()
            scope.step()  # recorded with every gradient present
            opt.zero_grad()
            opt.step()
    assert unchanged(before, model) == set(before)
    found = loud(scope.report)
    assert set(found) == {"no_update"}  # not "unmoved: check what the optimizer holds"
    (a,) = found["no_update"]
    assert a.severity == "error" and a.evidence["cause"] == "cleared" and "at 10 of 10 steps" in a.message


# --- backward without a step --------------------------------------------------------------------------


def test_backward_without_optimizer_step_is_reported_with_the_backward_count():
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = weights(model)
    with gradscope.watch(model, opt, quiet=True) as scope:
        for x, y in batches(12):
            opt.zero_grad()
            loss_of(model, x, y).backward()
    assert unchanged(before, model) == set(before)
    report = scope.report
    assert report.run.steps_completed == 0
    (a,) = report.anomalies
    assert (a.kind, a.severity, a.evidence) == ("step_not_called", "error", {"backwards": 12})
    assert "backward() ran 12 time(s) but optimizer.step() was never called" in a.message


def test_backward_without_scope_step_and_no_optimizer_says_to_call_it():
    model = net()
    with gradscope.watch(model, quiet=True) as scope:
        for x, y in batches(3):
            loss_of(model, x, y).backward()
    (a,) = scope.report.anomalies
    assert a.kind == "step_not_called" and "call scope.step() after backward()" in a.message


# --- eval mode --------------------------------------------------------------------------------------


def test_a_model_left_in_eval_mode_names_the_modules_it_changes():
    model = net()
    model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = model[1].running_mean.clone()
    report = plain_loop(model, opt)
    assert torch.equal(stats, model[1].running_mean)  # independent: BatchNorm no longer updates its statistics
    (a,) = loud(report)["eval_mode"]
    assert a.severity == "warning" and a.evidence["modules"] == ["1 (BatchNorm1d)", "3 (Dropout p=0.1)"]
    assert "model.train()" in a.message and a.module == "1"


def test_a_frozen_batchnorm_in_eval_inside_a_training_model_is_not_a_finding():
    model = net()
    model.train()
    model[1].eval()  # detection backbones freeze their BatchNorm statistics this way
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = model[1].running_mean.clone()
    report = plain_loop(model, opt)
    assert torch.equal(stats, model[1].running_mean)
    assert loud(report) == {} and report.run.loop.eval_steps == 0


def test_eval_mode_without_train_dependent_modules_is_not_a_finding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    assert loud(plain_loop(model, torch.optim.AdamW(model.parameters(), lr=1e-2), n=8)) == {}


# --- the forgotten zero_grad keeps its own finding ------------------------------------------------------


def test_a_forgotten_zero_grad_is_still_stale_gradient():
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with gradscope.watch(model, opt, quiet=True) as scope:
        for x, y in batches(8):
            loss_of(model, x, y).backward()
            opt.step()
    assert set(loud(scope.report)) == {"stale_gradient"}


def test_the_healthy_loop_is_quiet_and_every_update_moved():
    model = net()
    report = plain_loop(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    loop = report.run.loop
    assert loud(report) == {}
    assert (loop.backwards, loop.updates, loop.checked, loop.moved_checked, loop.unmoved_steps) == (40, 40, 40, 39, 0)
    assert loop.sampled == ("0.weight", "4.weight")


def test_the_loop_facts_read_back_from_json(tmp_path):
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model[4] = nn.Linear(16, 2)
    report = plain_loop(model, opt, n=4)
    report.save(str(tmp_path / "r.json"))
    import json

    back = gradscope.Report.from_dict(json.loads((tmp_path / "r.json").read_text()))
    assert back.run.loop == report.run.loop and back.run.loop.outside == ("4.weight", "4.bias")


class Checkpointed(nn.Module):
    """A block under reentrant checkpointing, whose backward calls torch.autograd.backward itself."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=True)


def test_a_backward_run_inside_a_backward_is_not_one_of_the_loops():
    torch.manual_seed(0)
    model = Checkpointed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    with gradscope.watch(model, opt, quiet=True) as scope:
        for x, y in batches(5):
            opt.zero_grad()
            loss = loss_of(model, x.requires_grad_(), y)
            loss.backward()
            opt.step()
            seen.append(loss.item())
    assert scope.report.run.loop.backwards == 5
    assert [s.loss for s in scope.report.steps] == seen
