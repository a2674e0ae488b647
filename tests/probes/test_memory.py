"""The memory ledger: what autograd saves for backward, per module, against an independent count
(the test's own pack hook and module stack, and a walk of the autograd graph) on real models."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradscope
from gradscope.report import Report
from gradscope.report_check import check_report
from gradscope.runner.checkpointing import checkpointing
from tests import memory_models as mm

TOKENS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
LM = {"input_ids": TOKENS, "labels": TOKENS}  # the model computes its own loss: all of it is in the ledger


def _loss(out: Any) -> torch.Tensor:
    if getattr(out, "loss", None) is not None:
        return out.loss
    out = out.sample if hasattr(out, "sample") else out
    return out.float().pow(2).mean()


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def ledger_and_count(
    build: Callable[[], nn.Module],
    inputs: Any,
    keeping: tuple[str, ...] = (),
    ours: tuple[str, ...] = (),
    autocast: bool = False,
) -> tuple[Any, dict[int, tuple[int, str]], int | None]:
    """The ledger of a watched training step, and the independent count of the same forward.

    Args:
        keeping: the checkpointed modules, whose inputs the count adds (what a checkpoint keeps).
        ours: modules run under gradscope's checkpointing.
    """
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with checkpointing(model, list(ours)):
        with amp:
            seen, out = mm.count_saved(model, lambda: _call(model, inputs), keeping)
        # The graph behind what the counted run returned: an LM's loss, the other models' output.
        end = out.loss if getattr(out, "loss", None) is not None else getattr(out, "sample", out)
        walked = None if keeping else mm.graph_saved(end, model)
        _loss(out).backward()
        optimizer.zero_grad()
        with gradscope.watch(model, optimizer, memory=True) as scope:
            with amp:
                loss = _loss(_call(model, inputs))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return scope.report.memory, seen, walked


MODELS = {
    "gpt2": (mm.gpt2, LM, [f"transformer.h.{i}" for i in range(3)]),
    "llama": (mm.llama, LM, ["model.layers.0", "model.layers.1"]),
    "unet": (mm.unet, {"sample": torch.randn(2, 3, 16, 16), "timestep": torch.tensor([10, 20])}, []),
    "cnn": (mm.widening, torch.randn(4, 3, 16, 16), ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4"]),
}


def _same_blocks(memory: Any, seen: dict[int, tuple[int, str]], blocks: list[str]) -> None:
    for block in blocks:
        assert memory.modules[block].saved_bytes == mm.inclusive(seen, block), block
    for name, m in memory.modules.items():  # every module, inclusive
        assert m.saved_bytes == mm.inclusive(seen, name), name


@pytest.mark.parametrize("name", list(MODELS))
def test_the_ledger_equals_an_independent_count_on_real_models(name):
    build, inputs, blocks = MODELS[name]
    memory, seen, walked = ledger_and_count(build, inputs)
    assert memory.saved_bytes == sum(n for n, _ in seen.values()) > 0
    _same_blocks(memory, seen, blocks)
    assert memory.modules[""].saved_bytes == memory.saved_bytes
    assert walked == memory.saved_bytes  # the autograd graph, walked node by node
    assert memory.saved_parameter_bytes > 0  # the weights linear layers save, counted apart


@pytest.mark.parametrize(
    ("model", "mode"),
    [
        ("gpt2", "plain"),
        ("gpt2", "reentrant"),
        ("gpt2", "gradscope"),
        ("llama", "plain"),
        ("llama", "reentrant"),
        ("llama", "gradscope"),
    ],
)
def test_under_checkpointing_the_ledger_counts_what_the_checkpoints_keep(model, mode):
    build, inputs, blocks = MODELS[model]
    full, _, _ = ledger_and_count(build, inputs)
    hf = (lambda: build(checkpointing=mode)) if mode != "gradscope" else build
    ours = tuple(blocks) if mode == "gradscope" else ()
    memory, seen, _ = ledger_and_count(hf, inputs, keeping=tuple(blocks), ours=ours)
    assert memory.saved_bytes == sum(n for n, _ in seen.values())
    _same_blocks(memory, seen, blocks)
    assert all(memory.modules[b].checkpointed for b in blocks)
    assert memory.saved_bytes < full.saved_bytes / 2  # the blocks' insides are recomputed, not kept


def test_gradscope_checkpointing_of_blocks_that_differ_in_size():
    build, inputs, blocks = MODELS["cnn"]
    chosen = ("blocks.0", "blocks.4")
    memory, seen, _ = ledger_and_count(build, inputs, keeping=chosen, ours=chosen)
    assert memory.saved_bytes == sum(n for n, _ in seen.values())
    _same_blocks(memory, seen, blocks)


@pytest.mark.parametrize("reentrant", [False, True], ids=["plain", "reentrant"])
def test_diffusers_checkpointing_in_both_modes_names_each_checkpointed_resnet(reentrant):
    # Diffusers calls checkpoint(resnet.__call__, ...): the resnet's own hooks run inside the
    # checkpoint (under no_grad in the reentrant mode); the test's function records what it checkpoints.
    called: list[str] = []

    def build() -> nn.Module:
        model = mm.unet()
        names = {id(m): n for n, m in model.named_modules()}

        def run(module: nn.Module, *args: Any) -> Any:
            called.append(names[id(module)])
            return checkpoint(module.__call__, *args, use_reentrant=reentrant)

        model.enable_gradient_checkpointing(run)
        return model

    _, inputs, _ = MODELS["unet"]
    build()(**inputs)
    kept = tuple(dict.fromkeys(called))
    assert len(kept) >= 4
    full, _, _ = ledger_and_count(mm.unet, inputs)
    memory, seen, _ = ledger_and_count(build, inputs, keeping=kept)
    assert memory.saved_bytes == sum(n for n, _ in seen.values())
    _same_blocks(memory, seen, list(kept))
    assert {n for n, m in memory.modules.items() if m.checkpointed} == set(kept)
    assert memory.saved_bytes < 0.6 * full.saved_bytes


def test_gradscope_checkpointing_of_unet_blocks():
    build, inputs, _ = MODELS["unet"]
    chosen = ("down_blocks.1", "up_blocks.0")
    memory, seen, _ = ledger_and_count(build, inputs, keeping=chosen, ours=chosen)
    assert memory.saved_bytes == sum(n for n, _ in seen.values())
    _same_blocks(memory, seen, list(chosen))
    assert {n for n, m in memory.modules.items() if m.checkpointed} == set(chosen)


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_autocast_saves_bf16_tensors_and_the_ledger_counts_them(name):
    build, inputs, blocks = MODELS[name]
    memory, seen, walked = ledger_and_count(build, inputs, autocast=True)
    assert memory.saved_bytes == sum(n for n, _ in seen.values()) == walked
    _same_blocks(memory, seen, blocks)
    assert memory.saved_by_dtype.get("bfloat16", 0) > memory.saved_bytes / 3


def test_bf16_autocast_under_hugging_face_checkpointing():
    build, inputs, blocks = MODELS["llama"]
    memory, seen, _ = ledger_and_count(
        lambda: build(checkpointing="plain"), inputs, keeping=tuple(blocks), autocast=True
    )
    assert memory.saved_bytes == sum(n for n, _ in seen.values())
    _same_blocks(memory, seen, blocks)
    assert memory.saved_by_dtype.get("bfloat16", 0) > 0


def test_parameters_gradients_and_adam_state_by_dtype():
    build, inputs, _ = MODELS["gpt2"]
    memory, _, _ = ledger_and_count(build, inputs)
    model = build()
    params = sum(
        t.untyped_storage().nbytes() for t in {p.untyped_storage().data_ptr(): p for p in model.parameters()}.values()
    )
    buffers = sum(b.untyped_storage().nbytes() for b in model.buffers())
    assert memory.parameter_bytes == {"float32": params + buffers}
    assert memory.gradient_bytes == {"float32": params}  # every parameter of an LM gets a gradient
    # AdamW: exp_avg and exp_avg_sq per parameter, plus a float32 step counter each.
    steps = 4 * len({p.untyped_storage().data_ptr() for p in model.parameters()})
    assert memory.optimizer_bytes == {"float32": 2 * params + steps}
    assert memory.batch_bytes == TOKENS.numel() * 8  # input_ids and labels are one tensor: counted once


def test_inspect_measures_the_model_and_its_loss_and_the_json_reads_back(tmp_path):
    raw = {
        "model": {"target": "tests.memory_models:widening"},
        "data": {"batch_size": 4, "input": {"shape": [3, 16, 16]}, "labels": {"classes": 10}},
        "steps": 2,
        "optimizer": {"name": "sgd", "lr": 0.01},
    }
    report = gradscope.inspect(raw)
    memory = report.memory
    model = mm.widening()
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    labels = torch.zeros(4, dtype=torch.long)
    seen, _ = mm.count_saved(model, lambda: nn.functional.cross_entropy(model(x), labels))
    alone, _ = mm.count_saved(model, lambda: model(x))
    assert memory.saved_bytes == sum(n for n, _ in seen.values())
    # The loss's ops, outside every module, are under the root.
    assert memory.outside_bytes == sum(n for n, _ in seen.values()) - sum(n for n, _ in alone.values()) > 0
    assert memory.step == 0 and memory.forward_flops and memory.forward_flops > 0
    data = json.loads(json.dumps(report.to_dict()))
    assert data["memory"]["saved_bytes"] == memory.saved_bytes
    assert data["memory"]["modules"]["blocks.0"]["saved_bytes"] == memory.modules["blocks.0"].saved_bytes
    check_report(data)
    assert Report.from_dict(data).memory == memory


def test_hooks_come_off_and_nothing_stays_on_the_model_when_the_forward_raises():
    model = mm.widening()
    before = {name: dict(m.__dict__) for name, m in model.named_modules()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError), gradscope.watch(model, optimizer, memory=True):
        model(torch.randn(2, 5, 16, 16))  # wrong channels: the stem raises inside the ledger's window
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
        assert m.__dict__.keys() == before[name].keys(), name
    assert not torch.nn.modules.module._global_forward_hooks


def test_the_ledger_measures_one_step_then_its_hooks_are_gone():
    model = mm.widening()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer, memory=True) as scope:
        assert _memory_hooks(model)
        for _ in range(2):
            model(torch.randn(2, 3, 16, 16)).sum().backward()
            optimizer.step()
            assert not _memory_hooks(model)  # off after the first step
            optimizer.zero_grad()
    assert scope.report.memory.step == 0


def _memory_hooks(model: nn.Module) -> list[Any]:
    hooks = [h for m in model.modules() for h in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]]
    return [h for h in hooks if type(getattr(h, "__self__", None)).__name__ == "MemoryProbe"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_ledger_sits_beside_the_allocators_view():
    raw = {
        "device": "cuda",
        "model": {"target": "tests.memory_models:gpt2"},
        "data": {"batch_size": 8, "input": {"tokens": {"vocab": 256, "length": 64}}, "labels": "input"},
        "loss": "output",
        "optimizer": {"name": "adamw"},
        "steps": 1,
    }
    memory = gradscope.inspect(raw).memory
    cuda = memory.cuda
    assert cuda is not None and cuda.peak >= cuda.allocated_after > cuda.allocated_before
    grown = cuda.allocated_after - cuda.allocated_before
    # What the forward left allocated is the saved tensors plus the outputs; the batch was there before.
    assert 0.5 * grown <= memory.saved_bytes <= grown + memory.batch_bytes
    assert cuda.ledger_error == pytest.approx((memory.saved_bytes - grown) / grown, abs=1e-3)
