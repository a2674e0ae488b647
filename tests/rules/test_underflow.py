"""Underflow is a value below what the low-precision type holds; a gradient that is zero in exact
arithmetic, which one precision rounds to 0 and the other to a residue, is cancellation, not a finding."""

import pytest
import torch

import gradscope
from tests import real_faults
from tests.corpus import recipes
from tests.locate.test_auxiliary import MODELS, flushed, lm
from tests.rules.test_corpus import corpus_report

PRECISIONS = {
    "bf16": "bf16",
    "fp16": {"dtype": "fp16", "scaler": True},
    "fp16-no-scaler": {"dtype": "fp16", "scaler": False},
}
WIDTH = 32  # real_faults.gpt2's n_embd: c_attn.bias holds the query, key and value biases in that order


def dit() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4,
    )  # fmt: skip


def key_over_query_in_float64(model: str) -> float:
    """Independently of gradscope, in float64: the key bias's largest gradient entry over the query
    bias's. Softmax is unchanged by a shift added to every key, so the first is zero by math."""
    torch.manual_seed(0)
    if model == "gpt2":
        net = real_faults.gpt2().double()
        ids = torch.randint(real_faults.VOCAB, (2, real_faults.LENGTH))
        net(input_ids=ids, labels=ids).loss.backward()
        bias = net.transformer.h[0].attn.c_attn.bias.grad
        query, key = bias[:WIDTH], bias[WIDTH : 2 * WIDTH]
    else:
        net = dit().double().train()
        inputs, noise = recipes.noisy_latents(batch=4, channels=4, size=8, classes=10)
        inputs["hidden_states"] = inputs["hidden_states"].double()
        recipes.noise_mse(net(**inputs), noise.double()).backward()
        attn = net.transformer_blocks[1].attn1
        query, key = attn.to_q.bias.grad, attn.to_k.bias.grad
    return float(key.abs().max() / query.abs().max())


def key_bias_lost(model: str, precision) -> tuple[dict[str, float], list[str]]:
    """gradscope's flushed fractions of the key biases, and the kinds it found."""
    if model == "gpt2":
        report = gradscope.inspect(lm("gpt2", precision=precision))
        keys = [n for n in report.steps[0].underflow if n.endswith("attn.c_attn.bias")]
    else:
        report = corpus_report("dit", precision=precision, steps=1)
        keys = [n for n in report.steps[0].underflow if n.endswith("to_k.bias")]
    assert keys
    return {n: report.steps[0].underflow[n] for n in keys}, [a.kind for a in report.anomalies]


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("model", ["gpt2", "dit"])
def test_attention_key_bias_cancellation_is_never_underflow(model, precision):
    """bf16 rounded GPT-2's and DiT's key-bias gradients to 0 where fp32 kept residues of ~1e-11
    (1e-7 of the query bias's), and gradient_underflow told a bf16 run to use bf16."""
    assert key_over_query_in_float64(model) < 1e-12  # zero by math, to float64's rounding
    lost, kinds = key_bias_lost(model, PRECISIONS[precision])
    assert all(fraction == 0 for fraction in lost.values()), lost
    assert "gradient_underflow" not in kinds


def test_fp16_underflow_in_a_real_model_is_found_without_a_scaler():
    raw = lm("gpt2", precision=PRECISIONS["fp16-no-scaler"], loss={"target": f"{MODELS}:tiny_loss"})
    report = gradscope.inspect(raw)
    (finding,) = report.anomalies
    assert finding.kind == "gradient_underflow" and finding.module == "transformer.ln_f"
    assert "Turn the grad scaler on" in finding.message
    measured = report.steps[0].underflow
    assert measured == flushed(raw, torch.float16)
    assert min(measured.values()) > 0.4
    # the key third of c_attn.bias cancels: never counted, though fp16 gives it 0 as well
    assert measured["transformer.h.0.attn.c_attn.bias"] <= 2 / 3
    scaled = gradscope.inspect({**raw, "precision": PRECISIONS["fp16"]})
    assert not scaled.anomalies and not any(scaled.steps[0].underflow.values())


def test_bf16_underflow_is_found_only_below_fp32_range_and_not_told_to_use_bf16():
    """bf16 has fp32's exponent range: a loss times 1e-40 makes gradients that fp32 keeps only as
    subnormals and bf16 flushes; the advice fits a bf16 run."""
    loss = {"target": f"{MODELS}:tiny_loss", "args": {"scale": 1e-40}}
    report = gradscope.inspect(lm("gpt2", precision="bf16", loss=loss))
    (finding,) = report.anomalies
    assert finding.kind == "gradient_underflow"
    assert "use bf16" not in finding.message.lower() and "multiply the loss" in finding.message
    assert report.steps[0].underflow == flushed(lm("gpt2", precision="bf16", loss=loss))
    healthy = gradscope.inspect(lm("gpt2", precision="bf16", loss={"target": f"{MODELS}:tiny_loss"}))
    assert not healthy.anomalies and not any(healthy.steps[0].underflow.values())
