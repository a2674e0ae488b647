"""Real models from transformers, peft and diffusers (built from their configs, random weights,
nothing downloaded), run as their recipes run: each must come out clean with ``--fail-on warning``.

timm and torchvision are not in the corpus: their wheels pull a CUDA build of torch that cannot
be installed beside the CPU torch the suite runs on.
"""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

import gradscope
from gradscope.cli import app
from tests.conftest import TESTS

runner = CliRunner()
CORPUS = TESTS / "corpus"
CASES = sorted(CORPUS.glob("*.yaml"))
# Crashes of the auxiliary analyses, not of the rules: the fp32 underflow replay and the origin
# search call torch.autograd.grad, which reentrant checkpointing forbids.
CRASHES = {}


def _case(path):
    reason = CRASHES.get(path.name)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.parametrize("path", [_case(p) for p in CASES])
def test_real_model_recipe_is_clean(path, tmp_path):
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["inspect", str(path), "--json", str(out), "--fail-on", "warning"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["run"]["steps_completed"] == report["run"]["steps_requested"]


def corpus_report(name: str, **changes):
    """The report of a corpus config, with top-level keys replaced."""
    raw = yaml.safe_load((CORPUS / f"{name}.yaml").read_text())
    raw.update(changes)
    path = CORPUS / f".{name}.tmp.yaml"  # beside the config: its targets are relative to it
    path.write_text(yaml.safe_dump(raw))
    try:
        return gradscope.inspect(str(path))
    finally:
        path.unlink()


def test_lora_b_at_zero_is_named_as_the_cause_not_vanishing():
    report = corpus_report("gpt2_lora", steps=2)
    (note,) = [a for a in report.anomalies if a.kind == "vanishing_gradient"]
    assert note.severity == "info" and note.parameter.endswith("lora_B.default.weight")
    assert all(n.endswith("lora_B.default.weight") for n in note.evidence["zero_initialised"])
    assert any("lora_A" in n for n in note.evidence["held_back"])
    # lora_A's gradient is exactly zero at the first step, by design
    a = "base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"
    assert report.steps[0].parameters[a].grad_norm == 0


def test_idle_experts_are_routing_not_unused_parameters():
    report = corpus_report("switch_moe")
    assert not [a for a in report.anomalies if a.kind == "unused_parameter"]
    (routing,) = [a for a in report.anomalies if a.kind == "expert_routing"]
    assert routing.severity == "info" and routing.module.endswith("mlp.experts")
    idle = routing.evidence["idle"]
    assert 0 < len(idle) < routing.evidence["experts"]
    assert all(routing.evidence["gradient_norm"][e] == 0 for e in idle)


def test_transformers_efficientnet_init_is_found_starved():
    """transformers draws EfficientNet's BatchNorm gains from N(0, 0.02) (its _init_weights treats
    BatchNorm2d like a Linear): each norm shrinks the signal ~50x, and the logits come out ~1e-37."""
    raw = yaml.safe_load((CORPUS / "efficientnet.yaml").read_text())
    raw["model"] = raw["model"]["args"]["model"]  # without the reset of the gains to 1
    raw["steps"] = 1
    report = gradscope.inspect({**raw, "data": {**raw["data"], "target": str(CORPUS / "recipes.py:images")}})
    kinds = {a.kind: a for a in report.anomalies}
    assert kinds["vanishing_gradient"].severity == "warning"
    assert "negligible everywhere" in kinds["vanishing_gradient"].message


def _gpt2_lora():
    import peft
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=32))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM")
    return peft.get_peft_model(base, config)


def _llama_reentrant():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return model


STEPS = 80  # of the watched loops
LOOPS = {
    # (build, autocast dtype, a GradScaler as the recipe uses one, learning rate)
    "gpt2_lora_fp16_scaler": (_gpt2_lora, torch.float16, True, 2e-4),
    "llama_hf_reentrant_bf16": (_llama_reentrant, torch.bfloat16, False, 3e-4),
}


@pytest.mark.parametrize("name", list(LOOPS))
def test_watched_training_loop_is_clean(name):
    """The loop a fine-tuning script writes, a fresh batch each step and a warm-up, under gradscope.watch,
    long enough for the steps to be judged one by one (past the first 16 kept in full), the spike
    rules to have their window and the update-ratio rule its steps after the warm-up."""
    build, dtype, scaled, lr = LOOPS[name]
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    scaler = torch.amp.GradScaler("cpu") if scaled else None
    with gradscope.watch(model, optimizer=opt, scaler=scaler, probes=("update_ratio",)) as scope:
        for step in range(STEPS):
            ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                loss = model(input_ids=ids, labels=ids).loss
            if scaler is None:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(opt)
                scaler.update()
            warmup.step()
    report = scope.report
    assert report.retained is not None and report.retained.totals.steps == STEPS
    assert report.at_or_above("warning") == [], [(a.kind, a.message) for a in report.anomalies]
