"""The loop checklist inside a real Hugging Face Trainer (a tiny GPT-2 made from its config), where each
bug can happen there: a schedule handed in through ``optimizers=`` that reaches 0 before the run ends,
a callback that clears the gradients in ``on_pre_optimizer_step`` (before or after gradscope's); and the
healthy twins: gradient accumulation (also one cut short by the end of the epoch), and an evaluation
run between steps. The Trainer calls ``model.train()``, ``zero_grad`` and ``optimizer.step()`` itself, so
eval mode, a forgotten ``zero_grad`` and a step never taken cannot happen in it. Which weights moved is
measured apart from gradscope, on copies of every parameter before and after each optimizer step."""

import logging

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, get_linear_schedule_with_warmup
from transformers.utils import logging as hf_logging

from gradscope.integrations.transformers import GradscopeCallback
from tests.integrations.test_transformers import gpt2, tokens
from tests.trainer_setup import fresh_accelerate, sgd_steps  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


class Moves(TrainerCallback):
    """Independent of gradscope: the names of the parameters each optimizer step changed."""

    def __init__(self) -> None:
        self.moved: list[set[str]] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.moved.append({n for n, p in model.named_parameters() if not torch.equal(self._before[n], p)})


class ZeroGrad(TrainerCallback):
    """A callback that clears every gradient after the Trainer's backward, before its step."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.zero_grad()


def train(tmp_path, model=None, optimizers=(None, None), callbacks=(), first=(), eval_data=None, **overrides):
    """Train ``model`` with gradscope's callback after ``first`` and before ``callbacks``; the report and
    the parameters each step moved."""
    watch, moves = GradscopeCallback(quiet=True), Moves()
    trainer = Trainer(
        model=model if model is not None else gpt2(),
        args=TrainingArguments(**sgd_steps(tmp_path, **overrides)),
        train_dataset=tokens(48),
        eval_dataset=eval_data,
        callbacks=[*first, watch, *callbacks, moves],
        optimizers=optimizers,
    )
    trainer.train()
    return watch.report, moves.moved


def loud(report) -> dict[str, list]:
    out: dict[str, list] = {}
    for a in report.at_or_above("warning"):
        out.setdefault(a.kind, []).append(a)
    return out


def test_hf_a_schedule_shorter_than_the_run_is_a_warning_from_the_step_it_reaches_zero(tmp_path):
    model = gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = get_linear_schedule_with_warmup(opt, 0, num_training_steps=2)  # the run has 6
    report, moved = train(tmp_path, model, (opt, schedule))
    assert [bool(m) for m in moved] == [True, True, False, False, False, False]  # independent
    (a,) = loud(report)["no_update"]
    assert a.severity == "warning" and a.evidence["cause"] == "lr_zero"
    assert "at 4 of 6 optimizer steps (from step 2)" in a.message and "num_training_steps" in a.message


@pytest.mark.parametrize("where", ["before", "after"])
def test_hf_a_callback_that_clears_the_gradients_before_the_step_is_named(tmp_path, where):
    zero = [ZeroGrad()]
    report, moved = train(tmp_path, first=zero if where == "before" else (), callbacks=zero if where == "after" else ())
    assert not any(moved)
    found = loud(report)
    assert set(found) == {"no_update"}  # not "unmoved: check what the optimizer holds"
    (a,) = found["no_update"]
    assert a.severity == "error" and a.evidence["cause"] == "cleared"
    assert "on_pre_optimizer_step" in a.message and "at 6 of 6 steps" in a.message


@pytest.mark.parametrize(("accumulate", "steps"), [(2, 6), (5, 3)])  # 5: 12 batches make steps of 5, 5 and 2
def test_hf_gradient_accumulation_is_quiet_and_each_step_moves_the_weights(tmp_path, accumulate, steps):
    report, moved = train(tmp_path, gradient_accumulation_steps=accumulate, max_steps=-1, num_train_epochs=1)
    assert loud(report) == {}
    assert len(moved) == steps and all("transformer.h.0.mlp.c_fc.weight" in m for m in moved)
    loop = report.run.loop
    assert (loop.backwards, loop.updates, len(report.steps)) == (12, steps, steps)


def test_hf_an_evaluation_between_steps_is_not_eval_mode(tmp_path):
    evaluated = []

    class Seen(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kwargs):
            evaluated.append(model.training)  # the Trainer evaluates in eval mode, then trains again

    report, moved = train(tmp_path, callbacks=[Seen()], eval_data=tokens(8), eval_strategy="steps", eval_steps=2)
    assert evaluated == [False, False, False] and all(moved)
    assert loud(report) == {} and report.run.loop.eval_steps == 0


class ClearsTheEmbeddings(TrainerCallback):
    """Keeps the position embeddings fixed by clearing their gradient before the step: a warning."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.transformer.wpe.weight.grad = None


@pytest.fixture
def verbosity():
    """The Trainer sets transformers' verbosity for the whole process from its log level: put it back."""
    before = hf_logging.get_verbosity()
    yield
    hf_logging.set_verbosity(before)


@pytest.mark.usefixtures("verbosity")
@pytest.mark.parametrize("log_level", ["warning", "error"])
def test_hf_says_a_warning_at_the_trainers_log_level_and_names_the_cleared_parameter(tmp_path, caplog, log_level):
    watch = GradscopeCallback()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, optim="sgd", report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, log_level=log_level,
    )  # fmt: skip
    model = gpt2()
    wpe = model.transformer.wpe.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="gradscope"):
        trainer = Trainer(model=model, args=args, train_dataset=tokens(16), callbacks=[watch, ClearsTheEmbeddings()])
        trainer.train()
    assert torch.equal(wpe, model.transformer.wpe.weight)  # independent: it never moved
    (a,) = loud(watch.report)["no_update"]
    assert (a.severity, a.evidence["parameters"]) == ("warning", ["transformer.wpe.weight"])
    said = [r for r in caplog.records if r.name == "gradscope.integrations.transformers"]
    if log_level == "error":  # the Trainer's log level silences gradscope's warnings as its own
        assert said == []
    else:
        assert said[0].levelno == logging.WARNING
        assert said[0].getMessage().startswith("gradscope: warning no_update at transformer.wpe: the gradients of 1")
