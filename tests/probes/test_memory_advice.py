"""Checkpointing advice, checked by the run itself: inspecting again with the suggested
``checkpointing:`` frees what the advice predicted; and the budget plan's pure logic."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradscope
from gradscope.report.memory import MemoryReport, ModuleMemory, parse_bytes
from gradscope.reporters.memory import WIDTH, memory_section, paste_lines
from gradscope.rules.checkpoint_advice import advise, compact
from gradscope.runner.checkpointing import checkpointing
from tests import memory_models as mm

GPT2 = {
    "model": {
        "target": "transformers:GPT2LMHeadModel",
        "args": {
            "config": {
                "target": "transformers:GPT2Config",
                "args": {"n_layer": 4, "n_embd": 64, "n_head": 4, "vocab_size": 256, "n_positions": 64},
            }
        },
    },
    "data": {"batch_size": 4, "input": {"tokens": {"vocab": 256, "length": 64}}, "labels": "input"},
    "loss": "output",
    "optimizer": {"name": "adamw", "lr": 1e-4},
    "steps": 1,
}
WIDENING = {
    "model": {"target": "tests.memory_models:widening"},
    "data": {"batch_size": 4, "input": {"shape": [3, 16, 16]}, "labels": {"classes": 10}},
    "optimizer": {"name": "sgd", "lr": 0.01},
    "steps": 1,
}


def _with(raw: dict, **top) -> dict:
    out = copy.deepcopy(raw)
    out.update(top)
    return out


def _freed(raw: dict, before: int, modules: list[str]) -> int:
    after = gradscope.inspect(_with(raw, checkpointing={"modules": modules})).memory
    assert all(after.modules[m].checkpointed for m in modules)
    return before - after.saved_bytes


@pytest.mark.parametrize("raw", [GPT2, WIDENING], ids=["gpt2", "blocks of different sizes"])
def test_each_candidate_frees_what_the_advice_predicts(raw):
    memory = gradscope.inspect(raw).memory
    advice = memory.checkpointing
    assert len(advice) >= 3
    for a in advice:
        assert a.frees_bytes == memory.modules[a.module].saved_bytes - memory.modules[a.module].keeps_bytes
        assert abs(_freed(raw, memory.saved_bytes, [a.module]) - a.frees_bytes) <= 0.1 * a.frees_bytes, a.module
    per_gflop = [a.bytes_per_gflop for a in advice]
    assert per_gflop == sorted(per_gflop, reverse=True)  # best first


def _gpt2_step() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(**GPT2["model"]["args"]["config"]["args"])).train()
    tokens = torch.randint(0, 256, (4, 64))
    return model, lambda m: m(input_ids=tokens, labels=tokens).loss


def _widening_step() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    x, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    return mm.widening(), lambda m: nn.functional.cross_entropy(m(x), labels)


def _counted(step: Callable[[], tuple[nn.Module, Any]], modules: list[str]) -> int:
    """What the test's own pack hook sees saved in one step with ``modules`` checkpointed."""
    model, run = step()
    with checkpointing(model, modules):
        seen, _ = mm.count_saved(model, lambda: run(model), keeping=modules)
    return sum(n for n, _ in seen.values())


@pytest.mark.parametrize(
    ("raw", "step"), [(GPT2, _gpt2_step), (WIDENING, _widening_step)], ids=["gpt2", "blocks of different sizes"]
)
def test_what_the_advice_predicts_is_freed_by_an_independent_count(raw, step):
    advice = gradscope.inspect(raw).memory.checkpointing
    full = _counted(step, [])
    for a in advice:
        freed = full - _counted(step, [a.module])
        assert abs(freed - a.frees_bytes) <= 0.1 * a.frees_bytes, (a.module, freed, a.frees_bytes)
    chosen = [a.module for a in advice[:2]]
    freed = full - _counted(step, chosen)
    predicted = sum(a.frees_bytes for a in advice[:2])
    assert abs(freed - predicted) <= 0.1 * predicted, (chosen, freed, predicted)


def test_blocks_of_different_sizes_are_ranked_by_bytes_per_flop():
    memory = gradscope.inspect(WIDENING).memory
    sizes = {a.module: a.frees_bytes for a in memory.checkpointing}
    assert sizes["blocks.4"] > sizes["blocks.2"] > sizes["blocks.0"]  # wider blocks save more
    flops = {a.module: a.flops for a in memory.checkpointing}
    assert flops["blocks.4"] > flops["blocks.2"] > flops["blocks.0"] > 0


@pytest.mark.parametrize("raw", [GPT2, WIDENING], ids=["gpt2", "blocks of different sizes"])
def test_the_budget_plan_fits_once_followed(raw):
    first = gradscope.inspect(raw).memory
    budget = first.total_bytes - first.saved_bytes // 2  # half the activations must go
    memory = gradscope.inspect(_with(raw, memory={"budget": f"{budget}B"})).memory
    plan = memory.plan
    assert plan is not None and plan.fits and plan.modules
    assert plan.frees_bytes >= memory.total_bytes - budget
    freed = _freed(raw, memory.saved_bytes, list(plan.patterns))
    assert abs(freed - plan.frees_bytes) <= 0.1 * plan.frees_bytes
    assert memory.total_bytes - freed <= budget * 1.1


def test_a_run_over_its_budget_is_an_error_finding_with_the_lines_to_paste():
    memory = gradscope.inspect(GPT2).memory
    report = gradscope.inspect(_with(GPT2, memory={"budget": f"{memory.total_bytes - memory.saved_bytes // 2}B"}))
    finding = next(a for a in report.anomalies if a.kind == "memory_budget")
    assert finding.severity == "error" and "checkpointing: {modules: [" in finding.message
    under = gradscope.inspect(_with(GPT2, memory={"budget": f"{memory.total_bytes * 2}B"}))
    assert not [a for a in under.anomalies if a.kind == "memory_budget"]


def test_a_budget_below_the_parameters_says_nothing_can_fit():
    memory = gradscope.inspect(GPT2).memory
    budget = sum(memory.parameter_bytes.values()) // 2
    report = gradscope.inspect(_with(GPT2, memory={"budget": f"{budget}B"}))
    assert not report.memory.plan.fits
    finding = next(a for a in report.anomalies if a.kind == "memory_budget")
    assert "parameters, gradients and optimizer state alone" in finding.message


def _table(**modules: tuple[int, int, int]) -> MemoryReport:
    """A ledger of candidates ``name=(saved, keeps, flops)`` under a root, 1000 bytes of state."""
    rows = {"": ModuleMemory(saved_bytes=sum(v[0] for v in modules.values()), order=0)}
    for i, (name, (saved, keeps, flops)) in enumerate(modules.items()):
        rows[name.replace("_", ".")] = ModuleMemory(saved, keeps_bytes=keeps, flops=flops, order=i + 1, candidate=True)
    saved = rows[""].saved_bytes
    return MemoryReport(step=0, saved_bytes=saved, modules=rows, parameter_bytes={"float32": 1000}, forward_flops=300)


def test_the_plan_takes_the_best_bytes_per_flop_and_drops_what_is_not_needed():
    memory = _table(h_0=(500, 100, 10), h_1=(300, 100, 100), h_2=(900, 100, 10))
    advised = advise(memory, budget=1000 + memory.saved_bytes - 700)
    assert [a.module for a in advised.checkpointing] == ["h.2", "h.0", "h.1"]
    assert advised.plan.modules == ("h.2",) and advised.plan.frees_bytes == 800
    assert advised.plan.slowdown == pytest.approx(10 / 900, abs=1e-4)
    enough = advise(memory, budget=10**9).plan
    assert enough.fits and not enough.modules


def test_nested_candidates_are_not_both_chosen():
    memory = _table(h_0=(800, 100, 50), h_0_mlp=(600, 100, 10))
    plan = advise(memory, budget=1000 + memory.saved_bytes - 650).plan
    assert plan.modules == ("h.0",)  # h.0.mlp alone frees 500; h.0 takes it in


def test_whole_lists_are_written_as_one_pattern():
    memory = _table(h_0=(1, 0, 1), h_1=(1, 0, 1), x_0=(1, 0, 1), x_1=(1, 0, 1))
    assert compact(("h.0", "h.1", "x.0"), memory.modules) == ["h.*", "x.0"]


@pytest.mark.parametrize(
    ("text", "size"), [("512MiB", 512 * 2**20), ("6GB", 6 * 10**9), ("6GiB", 6 * 2**30), ("1.5 KiB", 1536)]
)
def test_budget_units(text, size):
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text", ["6", 6, "-1GiB", "6 parsecs", "GiB", "0B"])
def test_budgets_refused(text):
    with pytest.raises(ValueError, match="got"):
        parse_bytes(text)


def test_the_section_stays_within_80_columns_and_the_paste_lines_are_yaml():
    import yaml

    report = gradscope.inspect(_with(GPT2, memory={"budget": "1MiB"}))
    for line in memory_section(report.memory).plain.splitlines():
        assert len(line) <= WIDTH, line
    names = [f"model.encoder.layers.{i}" for i in range(12)]
    lines = paste_lines(names)
    assert all(len(line) <= WIDTH - 4 for line in lines)
    assert yaml.safe_load("\n".join(lines)) == {"checkpointing": {"modules": names}}


def test_the_section_keeps_the_checkpointed_mark_the_dtypes_and_whole_notes_within_80_columns():
    from tests.probes.test_memory import MODELS, ledger_and_count

    build, inputs, _ = MODELS["gpt2"]
    memory, _, _ = ledger_and_count(lambda: build(checkpointing="plain"), inputs, keeping=(), autocast=True)
    assert len(memory.saved_by_dtype) == 3  # bfloat16, float32 and int64: too long for the first line
    text = memory_section(memory).plain
    lines = text.splitlines()
    assert all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    assert [line for line in lines if "transformer.h.0 " in line][0].endswith("% ckpt")
    note = memory.notes[0]
    assert len(note) > WIDTH and " ".join(" ".join(lines).split()).find(note) >= 0  # wrapped whole
    assert not [line for line in lines if line.endswith("...")]
    assert all(f"{dtype} " in text for dtype in memory.saved_by_dtype)


def test_a_long_list_of_saved_dtypes_goes_on_its_own_line():
    by = {"bfloat16": 1_572_864, "float32": 1_289_748, "int64": 2_304, "float16": 1_000_000}
    memory = MemoryReport(0, sum(by.values()), modules={}, saved_by_dtype=by, parameter_bytes={"float32": 10})
    lines = memory_section(memory).plain.splitlines()
    assert all(len(line) <= WIDTH and not line.endswith("...") for line in lines), lines
    assert all(f"{dtype} " in " ".join(lines[2:4]) for dtype in by)
