"""gradscope.watch in a user's own training loop: the same numbers and findings as inspect."""

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradscope
from gradscope import faults, zoo
from tests.conftest import norm64


def batch(n: int = 16, features: int = 16, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=gen), torch.randint(classes, (n,), generator=gen)


def mlp(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.MLP(in_features=16, hidden=32, depth=2, classes=4, **kwargs)


def test_optimizer_hook_records_true_norms_and_the_users_clipping():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    expected = []
    with gradscope.watch(model, optimizer=opt) as scope:
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            expected.append({n: norm64(p.grad) for n, p in model.named_parameters()})
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1).item()
            opt.step()
    report = scope.report
    assert len(report.steps) == 3
    for step, norms in zip(report.steps, expected):
        for name, value in norms.items():
            assert step.parameters[name].grad_norm == pytest.approx(value, rel=1e-6)  # before clipping
        assert step.clip_coefficient == pytest.approx(0.1 / math.sqrt(sum(v * v for v in norms.values())), rel=1e-4)
        assert step.grad_norm_total_clipped == pytest.approx(0.1, rel=1e-4)
    assert total > 0.1
    assert_untouched(model, opt)


def test_manual_steps_record_the_loss():
    model = mlp()
    x, y = batch()
    with gradscope.watch(model) as scope:
        for _ in range(2):
            model.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            scope.step(loss)
    assert [s.loss for s in scope.report.steps] == pytest.approx([loss.item()] * 2)


def test_same_numbers_as_inspect():
    raw = {
        "model": {"target": "gradscope.zoo:mlp", "args": {"in_features": 16, "hidden": 32, "depth": 2, "classes": 4}},
        "data": {"batch_size": 16, "input": {"shape": [16]}, "labels": {"classes": 4}},
        "steps": 1,
    }
    inspected = gradscope.inspect(raw).steps[0]
    inspection = gradscope.Inspection(gradscope.config.settings_from_dict(raw))
    model, data = inspection.model, inspection.batch
    with gradscope.watch(model) as scope:
        loss = torch.nn.functional.cross_entropy(model(data.inputs), data.labels)
        loss.backward()
        scope.step(loss)
    watched = scope.report.steps[0]
    for name, stats in inspected.parameters.items():
        assert watched.parameters[name].grad_norm == pytest.approx(stats.grad_norm, rel=1e-6)
        assert watched.parameters[name].zero_fraction == stats.zero_fraction
    assert watched.loss == pytest.approx(inspected.loss)


def test_grad_scaler_norms_are_unscaled():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = batch()
    with gradscope.watch(model, optimizer=opt, scaler=scaler) as scope:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaled = {n: norm64(p.grad) for n, p in model.named_parameters()}
        scaler.step(opt)
        scaler.update()
    step = scope.report.steps[0]
    assert step.loss_scale == 1024.0 and step.skipped is False
    for name, value in scaled.items():
        assert step.parameters[name].grad_norm == pytest.approx(value / 1024.0, rel=1e-6)
    assert scope.report.run.precision == "fp16"


def test_skipped_scaler_step_is_recorded():
    torch.manual_seed(0)
    model = faults.ScaledOutput(scale=1000.0, in_features=16, hidden=32, depth=2, classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batch()
    with gradscope.watch(model, optimizer=opt, scaler=scaler) as scope:
        for _ in range(2):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    steps = scope.report.steps
    assert [s.skipped for s in steps] == [True, True]
    assert [s.loss_scale for s in steps] == [65536.0, 32768.0]
    assert [a.kind for a in scope.report.anomalies] == ["loss_scale_overflow"]


def test_forgotten_zero_grad_is_a_stale_gradient():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch()
    with gradscope.watch(model, optimizer=opt) as scope:
        for _ in range(3):
            torch.nn.functional.cross_entropy(model(x), y).backward()  # no zero_grad
            opt.step()
    stale = [a for a in scope.report.anomalies if a.kind == "stale_gradient"]
    assert len(stale) == 1 and stale[0].step == 1 and stale[0].evidence["steps"] == [1, 2]


def test_accumulating_micro_batches_on_purpose_is_not_stale():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, optimizer=opt) as scope:
        for step in range(2):
            opt.zero_grad()
            for micro in range(3):
                x, y = batch(seed=10 * step + micro)
                torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert len(scope.report.steps) == 2
    assert not [a for a in scope.report.anomalies if a.kind == "stale_gradient"]


def test_raise_on_error_stops_before_the_update_with_the_origin():
    torch.manual_seed(0)
    model = faults.NanInForward(width=16, depth=4, fault_at=2, classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batch()
    with pytest.raises(gradscope.GradientAnomaly) as info, gradscope.watch(model, optimizer=opt, raise_on="error"):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    anomaly = info.value.anomaly
    assert anomaly.kind == "nonfinite_forward" and anomaly.module == "blocks.2" and anomaly.step == 0
    assert anomaly.evidence["op"] == "torch.log" and "faults.py" in anomaly.evidence["source"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # not updated
    assert_untouched(model, opt)


def test_nan_made_in_backward_is_located_in_a_user_loop():
    torch.manual_seed(0)
    model = faults.NanInBackward(width=16, depth=4, fault_at=1, classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    with gradscope.watch(model, optimizer=opt) as scope:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    (finding,) = scope.report.anomalies
    assert finding.kind == "nonfinite_gradient" and finding.module == "blocks.1"
    assert finding.evidence["op"] == "torch.sqrt"


def test_nan_made_by_the_loss_is_placed_after_the_model():
    model = mlp()
    x, y = batch()
    with gradscope.watch(model) as scope:
        loss = faults.log_loss(model(x), y)
        loss.backward()
        scope.step(loss)
    (finding,) = scope.report.anomalies
    assert finding.kind == "nonfinite_loss" and finding.evidence["phase"] == "loss"


def test_dead_relus_and_tensorboard_from_a_user_loop(tmp_path):
    model = mlp(bias=-5.0, init="kaiming")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch(n=32)
    with gradscope.watch(model, optimizer=opt, logdir=str(tmp_path)) as scope:
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert [a.module for a in scope.report.anomalies if a.kind == "dead_relu"] == ["blocks.0.act", "blocks.1.act"]
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert {e.step for e in acc.Scalars("grad_norm/out.weight")} == {0, 1}


def test_hooks_come_off_when_the_loop_raises():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError), gradscope.watch(model, optimizer=opt):
        torch.nn.functional.cross_entropy(model(batch()[0]), batch()[1]).backward()
        raise ValueError("the user's loop failed")
    assert_untouched(model, opt)
    assert not torch.overrides._get_current_function_mode_stack()


def assert_untouched(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    for p in model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    from torch.nn.modules import module as nn_module

    assert not nn_module._global_forward_hooks and not nn_module._global_forward_pre_hooks


def test_checkpointed_modules_in_a_user_model():
    class Checkpointed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inner.inp(x)
            for block in self.inner.blocks:
                h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
            return self.inner.out(h)

    model = Checkpointed()
    x, y = batch()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    expected = {n: norm64(p.grad) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with gradscope.watch(model) as scope:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        scope.step(loss)
    step = scope.report.steps[0]
    for name, value in expected.items():
        assert step.parameters[name].grad_norm == pytest.approx(value, rel=1e-6)
    assert len(step.activations) == 2  # each ReLU once, not again in the recompute


def test_compiled_model_gets_gradient_statistics_and_says_what_is_off(tmp_path):
    model = mlp()
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    with gradscope.watch(compiled, optimizer=opt, plot=str(tmp_path / "flow.png")) as scope:
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(compiled(x), y).backward()
            opt.step()
    report = scope.report
    assert len(report.steps) == 2 and "inp.weight" in report.steps[0].parameters
    assert any("torch.compile" in note for note in report.run.notes)
    assert (tmp_path / "flow.png").read_bytes()[:4] == b"\x89PNG"


def test_every_n_steps_measures_only_those(monkeypatch):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch()
    fetches = []
    original = torch.Tensor.tolist

    def counted(self, *args, **kwargs):
        fetches.append(1)
        return original(self, *args, **kwargs)

    with gradscope.watch(model, optimizer=opt, every=3) as scope:
        monkeypatch.setattr(torch.Tensor, "tolist", counted)
        for _ in range(7):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        monkeypatch.setattr(torch.Tensor, "tolist", original)
    assert [s.step for s in scope.report.steps] == [0, 3, 6]
    assert len(fetches) == 3
    assert all(s.activations for s in scope.report.steps)


def test_every_in_the_config():
    raw = {
        "model": {"target": "gradscope.zoo:mlp", "args": {"in_features": 16, "classes": 4}},
        "data": {"batch_size": 16, "input": {"shape": [16]}, "labels": {"classes": 4}},
        "steps": 5,
        "every": 2,
    }
    assert [s.step for s in gradscope.inspect(raw).steps] == [0, 2, 4]


def _global_forward_hooks() -> int:
    from torch.nn.modules import module

    return len(module._global_forward_hooks) + len(module._global_forward_pre_hooks)


def test_activation_modules_are_measured_by_their_own_hooks_after_the_first_step():
    # Every activation of the MLP is an nn.ReLU module: after step 0 (under the mode, which finds
    # them), hooks on those modules alone measure them, with the same keys and exact fractions.
    model = mlp(activation="relu")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = batch()
    relus = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.ReLU)}
    dead: list[dict[str, float]] = []
    seen: dict[str, float] = {}
    handles = [
        m.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, (out.amax(0) <= 0).float().mean()))
        for name, m in relus.items()
    ]
    hooks_before = _global_forward_hooks()
    with gradscope.watch(model, optimizer=opt) as scope:
        for step in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            dead.append({name: float(v) for name, v in seen.items()})
            if step:  # the mode and the global module hooks are off
                assert _global_forward_hooks() == hooks_before
            opt.step()
    for h in handles:
        h.remove()
    steps = scope.report.steps
    keys = sorted(steps[0].activations)
    assert len(keys) == len(relus) and all(sorted(s.activations) == keys for s in steps)
    for step, expected in zip(steps, dead):
        measured = {a.module: a.fraction for a in step.activations.values()}
        assert measured == pytest.approx(expected)
    assert any(v > 0 for v in dead[-1].values())  # lr 0.5 kills some units: a number worth comparing
    assert all(not m._forward_hooks for m in relus.values())  # every hook is off after the block


def test_functional_activations_keep_the_mode():
    class Functional(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    hooks: list[int] = []
    report = _two_watched_steps(Functional(), at_end=lambda: hooks.append(_global_forward_hooks()))
    assert hooks[0] > 0  # still the mode and its module tracker
    assert [len(s.activations) for s in report.steps] == [1, 1]


def _two_watched_steps(model: torch.nn.Module, at_end=None) -> gradscope.report.Report:
    """Two SGD steps of ``model`` under a watch; ``at_end()`` runs inside the block."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    with gradscope.watch(model, optimizer=opt) as scope:
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if at_end is not None:
            at_end()
    return scope.report


def test_an_activation_module_first_called_after_the_first_step_is_still_measured():
    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)
            self.first, self.later = torch.nn.ReLU(), torch.nn.Tanh()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            act = self.first if self.calls == 1 else self.later
            return self.b(act(self.a(x)))

    torch.manual_seed(0)
    first, second = _two_watched_steps(Branchy()).steps
    assert [(a.module, a.kind) for a in first.activations.values()] == [("first", "relu")]
    (later,) = second.activations.values()
    assert (later.module, later.kind) == ("later", "tanh") and "test_watch.py" in (later.source or "")


def test_an_output_that_cannot_be_written_is_refused_on_entry_with_the_hooks_off(tmp_path):
    """Not at the end of a long run: the block does not start, and the model keeps no hook."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    folder = tmp_path / "a folder"
    folder.mkdir()
    for outputs, message in (
        ({"json": str(folder)}, "json=: cannot write"),
        ({"json": str(tmp_path / "r.json"), "jsonl": str(tmp_path / "r.json")}, "json= writes there too"),
    ):
        with pytest.raises(gradscope.GradscopeError, match=message):
            with gradscope.watch(model, opt, **outputs):
                raise AssertionError("the block must not run")
        assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
        assert not opt._optimizer_step_pre_hooks and not torch.nn.modules.module._global_forward_pre_hooks
