"""The loop checklist inside a real Lightning Trainer, where each bug can happen there: a head made
after ``configure_optimizers``, a schedule that reaches 0, ``zero_grad`` in a hook between backward and
step, manual optimization that clears, skips backward or forgets ``zero_grad``, ``self.eval()`` inside
``training_step``; and their healthy twins (accumulation, manual accumulation, a frozen BatchNorm, a
validation run mid-epoch). Which weights moved is measured apart from gradscope: every parameter is
copied before each batch and compared after it."""

import logging
import warnings

import lightning.pytorch as L
import pytest
import torch
from torch import nn

from gradscope.integrations.lightning import GradscopeCallback
from tests.integrations.test_lightning import trainer_for

BATCHES = 16


def data(n: int = 4 * BATCHES) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=gen), torch.randn(n, 1, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


class Moves(L.Callback):
    """Independent of gradscope: the names of the parameters each batch changed."""

    def __init__(self) -> None:
        self.moved: list[set[str]] = []

    def on_train_batch_start(self, trainer, module, batch, index) -> None:
        self._before = {n: p.detach().clone() for n, p in module.named_parameters()}

    def on_train_batch_end(self, trainer, module, outputs, batch, index) -> None:
        self.moved.append({n for n, p in module.named_parameters() if not torch.equal(self._before[n], p)})


class Net(L.LightningModule):
    """The healthy module: Linear, BatchNorm, ReLU, Dropout, a Linear head; SGD over every parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1))
        self.head = nn.Linear(8, 1)

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(self.body(x)), y)

    def training_step(self, batch, index):
        return self.loss(batch)

    def validation_step(self, batch, index):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02)


class Manual(Net):
    """Manual optimization, in the order ``order`` names; ``every`` micro-batches a step."""

    def __init__(self, order: str = "right", every: int = 1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.order, self.every = order, every

    def training_step(self, batch, index):
        opt, loss = self.optimizers(), self.loss(batch)
        if self.order == "right":
            self.manual_backward(loss / self.every)
            if (index + 1) % self.every == 0:
                opt.step()
                opt.zero_grad()
        elif self.order == "zero_grad_between":
            self.manual_backward(loss)
            opt.zero_grad()
            opt.step()
        elif self.order == "no_backward":
            opt.zero_grad()
            opt.step()
        elif self.order == "no_zero_grad":
            self.manual_backward(loss)
            opt.step()
        return loss.detach()


def fit(module: L.LightningModule, val: bool = False, **trainer_args):
    callback, moves = GradscopeCallback(quiet=True), Moves()
    trainer_for(callback, moves, **trainer_args).fit(module, data(), data(8) if val else None)
    return callback.report, moves.moved


def loud(report) -> dict[str, list]:
    out: dict[str, list] = {}
    for a in report.at_or_above("warning"):
        out.setdefault(a.kind, []).append(a)
    return out


def every_name(module: nn.Module) -> set[str]:
    return {n for n, _ in module.named_parameters()}


# --- parameters in no param group ----------------------------------------------------------------------


class NewHead(Net):
    def on_fit_start(self) -> None:
        self.head = nn.Linear(8, 1)  # after configure_optimizers: the optimizer holds the old head


def test_lightning_a_head_made_after_configure_optimizers_is_named():
    module = NewHead()
    report, moved = fit(module)
    (a,) = loud(report)["not_in_optimizer"]
    assert set(loud(report)) == {"not_in_optimizer"}
    assert a.severity == "warning" and a.evidence["parameters"] == ["head.weight", "head.bias"]
    assert "built before they were created or replaced" in a.message
    # Independent: the new head never moved, the body did (its first bias, before BatchNorm, has next to no gradient).
    assert all(not m & {"head.weight", "head.bias"} and {"body.0.weight", "body.1.weight"} <= m for m in moved)


# --- the weights do not move ---------------------------------------------------------------------------


class ShortSchedule(Net):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.02)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / 4))  # total_steps 4, not 16
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def test_lightning_a_schedule_that_reaches_zero_early_is_a_warning_from_its_step():
    report, moved = fit(ShortSchedule())
    (a,) = loud(report)["no_update"]
    frozen = [i for i, m in enumerate(moved) if not m]
    assert frozen == list(range(4, BATCHES))  # independent: nothing moved from the fifth step on
    assert a.severity == "warning" and a.evidence["cause"] == "lr_zero"
    assert (report.run.loop.lr_zero_steps, report.run.loop.lr_zero_first) == (len(frozen), frozen[0])
    assert f"at {len(frozen)} of {BATCHES} optimizer steps (from step 4)" in a.message


class ZeroGradInHook(Net):
    def on_before_optimizer_step(self, optimizer) -> None:
        optimizer.zero_grad()  # between Lightning's backward and its step


@pytest.mark.parametrize("module", [ZeroGradInHook(), Manual("zero_grad_between")], ids=["hook", "manual"])
def test_lightning_zero_grad_between_backward_and_step_is_named(module):
    report, moved = fit(module)
    assert not any(moved)
    found = loud(report)
    assert set(found) == {"no_update"}
    (a,) = found["no_update"]
    assert a.severity == "error" and a.evidence["cause"] == "cleared"
    assert f"between backward() and optimizer.step() at {BATCHES} of {BATCHES} steps" in a.message
    assert "on_before_optimizer_step" in a.message


class ClearsTheBody(Net):
    def on_before_optimizer_step(self, optimizer) -> None:
        for p in self.body.parameters():
            p.grad = None  # the body kept fixed by clearing its gradients


def test_lightning_gradients_cleared_on_part_of_the_model_name_it_as_a_warning():
    module = ClearsTheBody()
    report, moved = fit(module)
    body = {n for n in every_name(module) if n.startswith("body.")}
    assert all(m == {"head.weight", "head.bias"} for m in moved)  # independent: the head alone trains
    (a,) = loud(report)["no_update"]
    assert a.severity == "warning" and a.evidence["cause"] == "cleared_part"
    assert set(a.evidence["parameters"]) == body and "requires_grad_(False)" in a.message


def test_lightning_manual_optimization_without_backward_is_no_gradient_alone():
    report, moved = fit(Manual("no_backward"))
    assert not any(moved)
    found = loud(report)
    assert set(found) == {"no_update"}  # not unused_parameter on every layer
    assert found["no_update"][0].evidence["cause"] == "no_gradient" and found["no_update"][0].severity == "error"


# --- steps and zero_grad in manual optimization ------------------------------------------------------


def test_lightning_manual_optimization_without_zero_grad_is_stale_gradient():
    report, moved = fit(Manual("no_zero_grad"))
    assert all(moved)
    assert set(loud(report)) == {"stale_gradient"}


@pytest.mark.parametrize("every", [1, 4])
def test_lightning_manual_optimization_done_right_is_quiet(every):
    report, moved = fit(Manual("right", every=every))
    assert loud(report) == {}
    steps = [i for i, m in enumerate(moved) if m]
    assert steps == [i for i in range(BATCHES) if (i + 1) % every == 0]  # independent: the stepping batches
    assert (report.run.loop.backwards, report.run.loop.updates) == (BATCHES, len(steps))


@pytest.mark.parametrize("accumulate", [4, 3])  # 3: the epoch's last step has one micro-batch
def test_lightning_accumulate_grad_batches_is_not_a_step_never_taken(accumulate):
    module = Net()
    report, moved = fit(module, accumulate_grad_batches=accumulate)
    assert loud(report) == {}
    steps = [i for i, m in enumerate(moved) if m]
    assert steps == [i for i in range(BATCHES) if (i + 1) % accumulate == 0 or i == BATCHES - 1]
    assert all({"body.0.weight", "head.weight", "head.bias"} <= moved[i] for i in steps)
    loop = report.run.loop
    assert (loop.backwards, loop.updates, len(report.steps)) == (BATCHES, len(steps), len(steps))


# --- eval mode --------------------------------------------------------------------------------------


class EvalInStep(Net):
    def training_step(self, batch, index):
        self.eval()  # left on by a helper that evaluates
        return self.loss(batch)


def test_lightning_eval_inside_training_step_is_named_with_the_modules_it_changes():
    module = EvalInStep()
    stats = module.body[1].running_mean.clone()
    report, _ = fit(module)
    assert torch.equal(stats, module.body[1].running_mean)  # independent: BatchNorm stopped tracking
    (a,) = loud(report)["eval_mode"]
    assert a.evidence["modules"] == ["body.1 (BatchNorm1d)", "body.3 (Dropout p=0.1)"]
    assert a.evidence["steps"] == BATCHES and "model.train()" in a.message


class FrozenBatchNorm(Net):
    def on_train_epoch_start(self) -> None:
        self.body[1].eval()  # its statistics kept fixed, as detection backbones do


def test_lightning_a_frozen_batchnorm_and_a_validation_run_mid_epoch_are_quiet():
    module = FrozenBatchNorm()
    stats = module.body[1].running_mean.clone()
    report, moved = fit(module, val=True, val_check_interval=4, limit_val_batches=2)
    assert torch.equal(stats, module.body[1].running_mean) and all(moved)
    assert loud(report) == {} and report.run.loop.eval_steps == 0

    report, _ = fit(Net(), val=True, val_check_interval=4, limit_val_batches=2)
    assert loud(report) == {} and report.run.loop.eval_steps == 0


def test_lightning_says_the_partial_clearing_through_its_own_warning():
    callback = GradscopeCallback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(callback).fit(ClearsTheBody(), data())
    said = [str(w.message) for w in caught if "gradscope" in str(w.message)]
    assert said[0].startswith("gradscope: warning no_update at body.0: the gradients of 4 parameter(s) were cleared")


def test_lightning_a_healthy_fit_says_only_an_info_summary_through_rank_zero_info(caplog):
    callback = GradscopeCallback()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        trainer_for(callback, accumulate_grad_batches=4).fit(Net(), data())
    assert not [w for w in caught if "gradscope" in str(w.message)]
    said = [r for r in caplog.records if "gradscope" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in said] == [
        (logging.INFO, "gradscope: 4 steps watched, no warnings or errors.")
    ]
    assert said[0].name.endswith("utilities.rank_zero")  # Lightning's own logger
