"""GradscopeCallback under the real PyTorch Lightning Trainer, on the CPU with a tiny module."""

import math

import lightning.pytorch as L
import pytest
import torch
from torch import nn

from gradscope import faults
from gradscope.errors import GradientAnomaly
from gradscope.integrations.lightning import GradscopeCallback
from tests.conftest import norm64


def data(n: int = 16) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=gen), torch.randn(n, 1, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


class Regressor(L.LightningModule):
    """training_step calls the submodules, not forward (as most LightningModules do)."""

    def __init__(self, nan: bool = False, scheduler: bool = False, fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.encoder = nn.Sequential(nn.Linear(4, 8), faults.LogBlock(8) if nan else nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.scheduler, self.fail_at = scheduler, fail_at
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        if index == self.fail_at:
            raise RuntimeError("the data loader broke")
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.encoder(x)).float(), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        if not self.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}}


class Reference(L.Callback):
    """The gradients as Lightning hands them to on_before_optimizer_step (accumulated, before clipping)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({n: norm64(p.grad) for n, p in pl_module.named_parameters()})


def trainer_for(*callbacks: L.Callback, epochs: int = 1, namespace=L, **trainer_args) -> L.Trainer:
    """A CPU trainer with nothing else on (no logger, checkpoints, progress bar or summary unless given)."""
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    return namespace.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        enable_model_summary=False,
        callbacks=list(callbacks),
        **{**quiet, **trainer_args},
    )


def fit(module: L.LightningModule, *callbacks: L.Callback, epochs: int = 1, **trainer_args) -> L.Trainer:
    trainer = trainer_for(*callbacks, epochs=epochs, **trainer_args)
    trainer.fit(module, data())
    return trainer


def no_hooks(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> bool:
    modules = all(not (m._forward_pre_hooks or m._forward_hooks or m._backward_hooks) for m in module.modules())
    params = all(not p._post_accumulate_grad_hooks for p in module.parameters())
    steps = optimizer is None or not (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks)
    return modules and params and steps and not torch.nn.modules.module._global_forward_pre_hooks


def total(norms: dict[str, float]) -> float:
    return math.sqrt(sum(v * v for v in norms.values()))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_each_step_matches_lightnings_own_hook_with_accumulation_clipping_and_a_scheduler(accumulate):
    module, reference, callback = Regressor(scheduler=True), Reference(), GradscopeCallback()
    trainer = fit(module, reference, callback, accumulate_grad_batches=accumulate, gradient_clip_val=0.3)
    steps = callback.report.steps
    assert len(steps) == len(reference.steps) == 4 // accumulate == trainer.global_step
    for i, (step, norms) in enumerate(zip(steps, reference.steps)):
        for name, value in norms.items():
            assert step.parameters[name].grad_norm == pytest.approx(value, rel=1e-6)
        assert step.grad_norm_total == pytest.approx(total(norms), rel=1e-6)
        assert step.clip_coefficient == pytest.approx(min(1.0, 0.3 / total(norms)), rel=1e-5)
        micro = module.losses[i * accumulate : (i + 1) * accumulate]
        assert step.loss == pytest.approx(sum(micro) / accumulate, rel=1e-6)
    assert no_hooks(module, trainer.optimizers[0])


def test_bf16_mixed_is_reported_as_bf16():
    callback = GradscopeCallback()
    fit(Regressor(), callback, precision="bf16-mixed")
    assert callback.report.run.precision == "bf16"


def test_nan_made_in_a_submodule_that_training_step_calls_is_found_there():
    callback = GradscopeCallback()
    fit(Regressor(nan=True), callback)
    origins = [s.origin for s in callback.report.steps if s.origin is not None]
    assert origins and origins[0].phase == "forward"
    assert origins[0].module == "encoder.1" and origins[0].op == "torch.log"
    assert any(a.kind.startswith("nonfinite") for a in callback.report.anomalies)


def test_raise_on_stops_fit_before_the_bad_update_and_takes_the_hooks_off(tmp_path):
    module = Regressor(nan=True)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    callback = GradscopeCallback(raise_on="error", json=str(tmp_path / "grads.json"))
    trainer = trainer_for(callback)
    with pytest.raises(GradientAnomaly) as raised:
        trainer.fit(module, data())
    assert raised.value.anomaly.kind.startswith("nonfinite")
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())  # not updated
    assert len(callback.report.steps) == 1 and (tmp_path / "grads.json").exists()
    assert no_hooks(module, trainer.optimizers[0])


def test_hooks_come_off_when_training_step_raises():
    module, callback = Regressor(fail_at=2), GradscopeCallback()
    trainer = trainer_for(callback)
    with pytest.raises(RuntimeError, match="data loader broke"):
        trainer.fit(module, data())
    assert len(callback.report.steps) == 2
    assert no_hooks(module, trainer.optimizers[0])


def test_numbers_reach_the_modules_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    callback = GradscopeCallback()
    trainer = trainer_for(callback, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1)
    trainer.fit(Regressor(), data())
    import csv

    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [float(r["gradscope/grad_norm"]) for r in rows if r.get("gradscope/grad_norm")]
    assert logged == pytest.approx([s.grad_norm_total for s in callback.report.steps], rel=1e-6)
    assert any(key.startswith("gradscope/grad_norm/encoder.0.weight") for key in rows[0])


def test_the_pytorch_lightning_namespace_works_too():
    import pytorch_lightning as PL

    class Module(PL.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.net = nn.Linear(4, 1)

        def training_step(self, batch, index):
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = GradscopeCallback()
    module = Module()
    trainer = trainer_for(callback, namespace=PL)
    trainer.fit(module, data())
    assert len(callback.report.steps) == 4 and callback.report.steps[0].loss is not None
    assert no_hooks(module, trainer.optimizers[0])


def test_bad_arguments_are_refused_when_the_callback_is_made():
    with pytest.raises(ValueError, match="raise_on must be one of"):
        GradscopeCallback(raise_on="fatal")
    with pytest.raises(ValueError, match="every must be a positive"):
        GradscopeCallback(every=0)


class Weights(L.Callback):
    """Each step's weights as the optimizer is about to update them."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({n: p.detach().double().clone() for n, p in pl_module.named_parameters()})


def test_probe_values_reach_the_logger_and_the_json_report_is_written(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from gradscope.reporters.json import load_report

    callback, weights = GradscopeCallback(probes=("update_ratio",), json=str(tmp_path / "r.json")), Weights()
    trainer = trainer_for(weights, callback, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1)
    trainer.fit(Regressor(), data())
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [
        float(r["gradscope/update_ratio/head.weight"]) for r in rows if r.get("gradscope/update_ratio/head.weight")
    ]
    w = [step["head.weight"] for step in weights.steps]
    by_hand = [(torch.linalg.vector_norm(b - a) / torch.linalg.vector_norm(a)).item() for a, b in zip(w, w[1:])]
    assert len(by_hand) == 3 and logged == pytest.approx(by_hand, rel=1e-5)
    saved = load_report(tmp_path / "r.json")
    assert [s.grad_norm_total for s in saved.steps] == [s.grad_norm_total for s in callback.report.steps]
    with pytest.raises(ValueError, match="update_ratio"):
        GradscopeCallback(probes=("update_ratios",))
