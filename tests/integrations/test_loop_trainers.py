"""The loop checklist inside the real Lightning Trainer and Hugging Face Trainer, which hand the callback
the real optimizer: each bug that can happen there, its healthy twin, and the host's own channel for
what the watch says (Lightning's rank_zero_warn, transformers' logger)."""

import logging
import warnings

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from gradscope.integrations.lightning import GradscopeCallback as LightningCallback
from gradscope.integrations.lightning import GradscopeWarning
from gradscope.integrations.transformers import GradscopeCallback as HFCallback
from tests.integrations.test_lightning import trainer_for
from tests.integrations.test_transformers import gpt2, tokens
from tests.trainer_setup import fresh_accelerate, sgd_steps  # noqa: F401 (a fixture)


def data(n: int = 32) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=gen), torch.randn(n, 1, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


class Net(L.LightningModule):
    def __init__(self, subset=False, frozen_head=False, lr=0.02, warm_up=False, evaluate=False, no_step=False):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1))
        self.head = nn.Linear(8, 1)
        self.head.requires_grad_(not frozen_head)
        self.subset, self.lr, self.warm_up, self.evaluate = subset, lr, warm_up, evaluate
        self.automatic_optimization = not no_step
        self.moved: list[bool] = []

    def training_step(self, batch, index):
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.body(x)), y)
        if not self.automatic_optimization:
            self.manual_backward(loss)  # and optimizer.step() forgotten
            return None
        return loss

    def on_train_epoch_start(self) -> None:
        if self.evaluate:
            self.eval()

    def on_before_optimizer_step(self, optimizer) -> None:
        self._before = self.body[0].weight.detach().clone()

    def on_train_batch_end(self, outputs, batch, index) -> None:
        if self.automatic_optimization:
            self.moved.append(not torch.equal(self._before, self.body[0].weight))

    def configure_optimizers(self):
        params = self.body.parameters() if self.subset else [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.lr)
        if not self.warm_up:
            return opt
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 3))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fit(module: Net, quiet: bool = True):
    callback = LightningCallback(quiet=quiet)
    trainer_for(callback).fit(module, data())
    return callback.report


def loud(report) -> dict[str, list]:
    out: dict[str, list] = {}
    for a in report.at_or_above("warning"):
        out.setdefault(a.kind, []).append(a)
    return out


# --- Lightning -------------------------------------------------------------------------------------


def test_lightning_an_optimizer_given_a_subset_names_the_parameters_it_leaves_out():
    module = Net(subset=True)
    head = module.head.weight.detach().clone()
    found = loud(fit(module))
    assert set(found) == {"not_in_optimizer"}
    (a,) = found["not_in_optimizer"]
    assert a.severity == "warning" and a.evidence["parameters"] == ["head.weight", "head.bias"]
    assert torch.equal(head, module.head.weight)  # independent: the head never moved


def test_lightning_a_frozen_head_the_optimizer_does_not_hold_is_quiet():
    module = Net(frozen_head=True)
    assert loud(fit(module)) == {}
    assert all(module.moved)


def test_lightning_lr_zero_is_an_error_and_a_warm_up_from_zero_is_quiet():
    stuck, warm = Net(lr=0.0), Net(warm_up=True)
    found = loud(fit(stuck))
    assert not any(stuck.moved) and found["no_update"][0].severity == "error"
    assert found["no_update"][0].evidence["cause"] == "lr_zero"
    assert loud(fit(warm)) == {}
    assert warm.moved[0] is False and all(warm.moved[1:])  # independent: only the first update was zero


def test_lightning_a_model_put_in_eval_mode_is_named_with_its_dropout_and_batchnorm():
    module = Net(evaluate=True)
    found = loud(fit(module))
    (a,) = found["eval_mode"]
    assert a.evidence["modules"] == ["body.1 (BatchNorm1d)", "body.3 (Dropout p=0.1)"]
    assert not module.training and all(module.moved)


def test_lightning_manual_optimization_that_never_steps_is_reported():
    report = fit(Net(no_step=True))
    (a,) = report.anomalies
    assert a.kind == "step_not_called" and a.evidence == {"backwards": 8}


def test_lightning_says_a_finding_through_rank_zero_warn_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(Net(lr=0.0), quiet=False)
    said = [str(w.message) for w in caught if issubclass(w.category, GradscopeWarning)]
    assert len(said) == 2 and said[0].startswith("gradscope: error no_update:")  # the finding once
    assert said[1].startswith("gradscope: 8 steps watched, 1 finding(s): error no_update")  # the summary


# --- the Hugging Face Trainer ------------------------------------------------------------------------


def hf_train(tmp_path, model, optimizer=None, quiet=True, **overrides):
    callback = HFCallback(quiet=quiet)
    args = TrainingArguments(**sgd_steps(tmp_path, **overrides))
    optimizers = (optimizer, None) if optimizer is not None else (None, None)
    Trainer(model=model, args=args, train_dataset=tokens(24), callbacks=[callback], optimizers=optimizers).train()
    return callback.report


@pytest.mark.usefixtures("fresh_accelerate")
def test_hf_an_optimizer_over_a_subset_names_the_rest_and_freezing_them_is_quiet(tmp_path):
    model = gpt2()
    outside = [n for n, _ in model.named_parameters() if not n.startswith("transformer.h.")]
    wte = model.transformer.wte.weight.detach().clone()
    found = loud(hf_train(tmp_path, model, torch.optim.SGD(model.transformer.h.parameters(), lr=0.1)))
    assert set(found) == {"not_in_optimizer"}
    assert found["not_in_optimizer"][0].evidence["parameters"] == outside
    assert torch.equal(wte, model.transformer.wte.weight)

    twin = gpt2()
    for name, p in twin.named_parameters():
        p.requires_grad_(name.startswith("transformer.h."))
    assert loud(hf_train(tmp_path, twin, torch.optim.SGD(twin.transformer.h.parameters(), lr=0.1))) == {}


@pytest.mark.usefixtures("fresh_accelerate")
def test_hf_learning_rate_zero_is_an_error_and_a_linear_warm_up_from_zero_is_quiet(tmp_path):
    model = gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    found = loud(hf_train(tmp_path, model, learning_rate=0.0))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    (a,) = found["no_update"]
    assert a.severity == "error" and a.evidence["cause"] == "lr_zero" and a.evidence["count"] == 6

    warm = hf_train(tmp_path, gpt2(), lr_scheduler_type="linear", warmup_steps=3)
    assert warm.run.loop.lr_zero_steps == 1 and loud(warm) == {}


@pytest.mark.usefixtures("fresh_accelerate")
def test_hf_says_a_finding_through_the_transformers_logger(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        hf_train(tmp_path, gpt2(), quiet=False, learning_rate=0.0)
    said = [r for r in caplog.records if r.name == "gradscope.integrations.transformers"]
    assert said[0].levelno == logging.ERROR and said[0].getMessage().startswith("gradscope: error no_update:")
    assert said[-1].getMessage().startswith("gradscope: 6 steps watched, 1 finding(s): error no_update")
