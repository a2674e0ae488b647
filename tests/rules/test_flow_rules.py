"""The flow and activation rules on models built to trigger them, and on designs that look like
faults but are not: zero-initialised partners, attention at init, sparse codes, idle experts,
gradients scaled by the loss."""

import pytest

import gradscope
from tests.conftest import TESTS, config

MODELS = TESTS / "flow_models.py"


def model(name: str) -> str:
    return f"{MODELS}:{name}"


def findings(raw: dict, severity: str = "warning") -> dict[str, list]:
    """Findings at ``severity`` or above, by kind."""
    out: dict[str, list] = {}
    for a in gradscope.inspect(raw).at_or_above(severity):
        out.setdefault(a.kind, []).append(a)
    return out


IMAGES = {"batch_size": 8, "input": {"shape": [3, 8, 8]}, "labels": {"classes": 4}}


@pytest.mark.parametrize("name", ["ReZero", "GatedStack"])
def test_zero_initialised_gates_are_named_not_reported_as_zero_gradient(name):
    report = gradscope.inspect(config(model(name), {}))
    assert report.at_or_above("warning") == []
    (note,) = [a for a in report.anomalies if a.kind == "vanishing_gradient"]
    assert note.severity == "info"
    assert all("alphas" in n or n.endswith(".gate") for n in note.evidence["zero_initialised"])


def test_zero_init_residual_batchnorm_gains_are_design():
    report = gradscope.inspect(config(model("ZeroInitResidual"), {}, data=IMAGES))
    assert report.at_or_above("warning") == []
    (note,) = [a for a in report.anomalies if a.kind == "vanishing_gradient"]
    assert note.evidence["zero_initialised"] == [f"blocks.{i}.4.weight" for i in range(3)]
    assert note.evidence["branches"]["blocks.0.4.weight"] == "blocks.0"


def test_zero_weights_that_get_no_gradient_are_still_a_fault():
    # every hidden weight at zero: they get no gradient themselves, so nothing opens them
    raw = config(
        "gradscope.zoo:mlp",
        {"in_features": 8, "hidden": 16, "depth": 3, "classes": 4, "init": "zeros", "activation": "tanh"},
    )
    assert "zero_gradient" in findings(raw)


def test_rounding_level_gradient_behind_a_closed_gate_is_starved():
    found = findings(config(model("ClosedGate"), {}, steps=2, optimizer={"name": "adam", "lr": 1e-3}))
    (zero,) = found["zero_gradient"]
    assert zero.parameter == "gate" and "rounding-level" in zero.message
    assert not zero.evidence["exact"]
    assert {"branch.0.weight", "branch.2.weight", "gate"} <= set(zero.evidence["parameters"])


def test_sparse_relu_code_is_not_dead():
    raw = config(model("SparseCode"), {}, data={"batch_size": 16, "input": {"shape": [8]}, "labels": {"classes": 4}})
    report = gradscope.inspect(raw)
    (stats,) = report.steps[0].activations.values()
    assert stats.fraction > 0.5  # most units are silent in this batch, as the old rule read it
    assert 0.005 < stats.density < 0.05
    assert "dead_relu" not in findings(raw)


def test_dead_relu_message_says_what_was_tested():
    raw = config(
        "gradscope.zoo:mlp",
        {"in_features": 8, "hidden": 64, "depth": 2, "classes": 4, "bias": -3.0, "init": "kaiming"},
        data={"batch_size": 32, "input": {"shape": [8]}, "labels": {"classes": 4}},
    )
    dead = findings(raw)["dead_relu"]
    assert dead and all("Tested against sparsity" in a.message for a in dead)
    assert all(a.evidence["fraction"] > a.evidence["silent_by_sparsity"] for a in dead)


def test_relu_spelled_as_clamp_and_relu6_is_counted():
    raw = config(model("ClampRelus"), {}, data={"batch_size": 32, "input": {"shape": [8]}, "labels": {"classes": 4}})
    report = gradscope.inspect(raw)
    sites = report.steps[0].activations.values()
    assert len(sites) == 5 and all(a.kind == "relu" and a.fraction == 1.0 for a in sites)
    assert len({a.source for a in sites}) == 5 and all("flow_models.py:" in a.source for a in sites)
    assert len(findings(raw)["dead_relu"]) == 5


def summed(optimizer: dict | None, scale: float = 1.0) -> dict:
    return config(
        model("SummedLoss"),
        {},
        data={"batch_size": 64, "input": {"shape": [8]}, "labels": {"classes": 4}},
        loss={"target": f"{MODELS}:summed_cross_entropy", "args": {"scale": scale}},
        steps=2,
        **({"optimizer": optimizer} if optimizer else {}),
    )


def test_a_scaled_loss_under_adam_is_not_explosion():
    assert "exploding_gradient" not in findings(summed({"name": "adamw", "lr": 1e-3}, scale=1e4))


def test_a_scaled_loss_under_sgd_is_judged_by_its_learning_rate():
    found = findings(summed({"name": "sgd", "lr": 0.1}, scale=1e4))
    (boom,) = found["exploding_gradient"]
    assert "at lr 0.1" in boom.message and boom.evidence["lr"] == 0.1
    assert "exploding_gradient" not in findings(summed({"name": "sgd", "lr": 1e-9}, scale=1e4))


def test_attention_query_and_key_at_init_are_not_vanishing():
    """At init the softmax is near uniform, so q/k weights get second-order gradients while the same
    block's value and MLP weights are normal: blocks are compared as a whole."""
    raw = config(
        "transformers:BartForConditionalGeneration",
        {
            "config": {
                "target": "transformers:BartConfig",
                "args": {
                    "encoder_layers": 2,
                    "decoder_layers": 2,
                    "d_model": 32,
                    "encoder_ffn_dim": 64,
                    "decoder_ffn_dim": 64,
                    "encoder_attention_heads": 4,
                    "decoder_attention_heads": 4,
                    "vocab_size": 128,
                    "max_position_embeddings": 32,
                },
            }
        },
        data={
            "target": f"{TESTS / 'corpus' / 'recipes.py'}:seq2seq",
            "args": {"batch": 4, "length": 16, "target_length": 8, "vocab": 128},
        },
        loss="output",
    )
    report = gradscope.inspect(raw)
    rel = {n: s.grad_to_param for n, s in report.steps[0].parameters.items() if s.grad_to_param}
    k = rel["model.encoder.layers.1.self_attn.k_proj.weight"]
    assert k < 1e-4 * rel["model.decoder.layers.1.fc2.weight"]  # what the old rule read as vanishing
    assert report.at_or_above("warning") == []


def test_vanishing_still_found_when_early_blocks_as_a_whole_starve():
    raw = config(
        "gradscope.zoo:mlp",
        {"in_features": 16, "hidden": 16, "depth": 24, "classes": 4, "activation": "sigmoid"},
        data={"batch_size": 16, "input": {"shape": [16]}, "labels": {"classes": 4}},
    )
    (v,) = findings(raw)["vanishing_gradient"]
    assert v.severity == "error" and v.evidence["blocks"]
