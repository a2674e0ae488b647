"""GradscopeCallback under the real Hugging Face Trainer (and accelerate), on the CPU with a tiny GPT-2."""

import math

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from gradscope.errors import GradientAnomaly
from gradscope.integrations.transformers import GradscopeCallback
from tests.conftest import norm64
from tests.trainer_setup import fresh_accelerate  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


class Log(nn.Module):
    """An activation that takes a log: NaN wherever its input is negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


def gpt2(nan: bool = False) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    if nan:
        model.transformer.h[1].mlp.act = Log()
    return model


def tokens(n: int = 16) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(32, (n, 8), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in ids]


class Reference(TrainerCallback):
    """The gradients as the Trainer hands them to the optimizer (accumulated, after its clipping)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: norm64(p.grad) for n, p in model.named_parameters() if p.grad is not None})


def trainer(tmp_path, model: nn.Module, *callbacks: TrainerCallback, dataset=None, **overrides) -> Trainer:
    """The HF Trainer on the CPU, SGD, 4 steps of 4 rows, nothing saved or reported (``overrides``:
    other ``TrainingArguments``; ``dataset``: rows in place of the token batches)."""
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=0.1,
        optim="sgd",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        train_sampling_strategy="sequential",
        disable_tqdm=True,
    )
    args = TrainingArguments(**{**settings, **overrides})
    rows = dataset if dataset is not None else tokens()
    return Trainer(model=model, args=args, train_dataset=rows, callbacks=list(callbacks))


def no_hooks(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    modules = all(not (m._forward_pre_hooks or m._forward_hooks) for m in model.modules())
    params = all(not p._post_accumulate_grad_hooks for p in model.parameters())
    return modules and params and not (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks)


def logged(run: Trainer, key: str) -> list[float]:
    return [entry[key] for entry in run.state.log_history if key in entry and "train_runtime" not in entry]


def test_each_step_matches_the_trainers_grad_norm_with_accumulation_clipping_and_a_scheduler(tmp_path):
    reference, callback = Reference(), GradscopeCallback()
    run = trainer(
        tmp_path,
        gpt2(),
        reference,
        callback,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
        lr_scheduler_type="linear",
    )
    run.train()
    steps = callback.report.steps
    assert len(steps) == len(reference.steps) == 4
    assert [s.grad_norm_total for s in steps] == pytest.approx(logged(run, "grad_norm"), rel=1e-5)
    assert logged(run, "gradscope/grad_norm") == pytest.approx(logged(run, "grad_norm"), rel=1e-5)
    assert [s.loss for s in steps] == pytest.approx(logged(run, "loss"), rel=1e-5)
    for step, clipped in zip(steps, reference.steps):
        coefficient = min(1.0, 0.5 / step.grad_norm_total)
        assert step.clip_coefficient == pytest.approx(coefficient, rel=1e-5)
        for name, value in clipped.items():  # the Trainer clipped them; gradscope reports them unclipped
            assert step.parameters[name].grad_norm * coefficient == pytest.approx(value, rel=1e-5)
    assert no_hooks(run.model, run.optimizer.optimizer)


def test_without_clipping_each_parameter_matches_the_gradient_the_optimizer_gets(tmp_path):
    reference, callback = Reference(), GradscopeCallback()
    trainer(tmp_path, gpt2(), reference, callback, max_grad_norm=0).train()
    for step, norms in zip(callback.report.steps, reference.steps):
        for name, value in norms.items():
            assert step.parameters[name].grad_norm == pytest.approx(value, rel=1e-6)
        assert step.clip_coefficient is None


def test_bf16_is_reported_as_bf16(tmp_path):
    callback = GradscopeCallback()
    trainer(tmp_path, gpt2(), callback, bf16=True, max_steps=1).train()
    assert callback.report.run.precision == "bf16"


def test_nan_made_in_a_submodule_of_the_model_is_found_there(tmp_path):
    callback = GradscopeCallback()
    trainer(tmp_path, gpt2(nan=True), callback, max_steps=1).train()
    origin = callback.report.steps[0].origin
    assert origin is not None and origin.phase == "forward"
    assert origin.module == "transformer.h.1.mlp.act" and origin.op == "torch.log"


def test_raise_on_stops_training_before_the_bad_update_and_takes_the_hooks_off(tmp_path):
    model = gpt2(nan=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = GradscopeCallback(raise_on="error", json=str(tmp_path / "grads.json"))
    run = trainer(tmp_path, model, callback, max_grad_norm=0)
    with pytest.raises(GradientAnomaly) as raised:
        run.train()
    assert raised.value.anomaly.kind.startswith("nonfinite")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # not updated
    assert len(callback.report.steps) == 1 and (tmp_path / "grads.json").exists()
    assert no_hooks(model, run.optimizer.optimizer)


def test_hooks_come_off_when_the_model_raises_inside_the_with_block(tmp_path):
    class Breaks(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("broken block")

    model = gpt2()
    run = trainer(tmp_path, model, max_steps=3)
    model.transformer.h[1].mlp.act = Breaks()
    with GradscopeCallback() as callback:
        run.add_callback(callback)
        with pytest.raises(RuntimeError, match="broken block"):
            run.train()
    assert callback.report is not None and not callback.report.steps
    assert no_hooks(model, run.optimizer.optimizer)


def test_loss_is_averaged_over_micro_batches_for_a_model_without_loss_kwargs(tmp_path):
    class Regressor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Linear(8, 1)

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.net(input_ids.float()).squeeze(-1)
            return {"loss": nn.functional.mse_loss(out, labels.float().mean(-1)), "logits": out}

    callback = GradscopeCallback()
    run = trainer(tmp_path, Regressor(), callback, gradient_accumulation_steps=2, learning_rate=1e-3)
    run.train()
    assert [s.loss for s in callback.report.steps] == pytest.approx(logged(run, "loss"), rel=1e-5)
    assert all(math.isfinite(s.grad_norm_total) for s in callback.report.steps)
