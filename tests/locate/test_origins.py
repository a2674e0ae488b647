"""Where a NaN/Inf is made: the first non-finite value that reaches the result, not the first one made."""

import gradscope
from tests.conftest import TESTS
from tests.locate.test_auxiliary import lm

MODELS = str(TESTS / "real_faults.py")


def nonfinite(report) -> dict:
    (finding,) = [a for a in report.anomalies if a.kind.startswith("nonfinite")]
    return {**finding.evidence, "finding": finding.kind, "module": finding.module}


def test_infs_made_and_thrown_away_upstream_are_not_the_origin_of_a_real_overflow():
    raw = {
        "model": {"target": f"{MODELS}:DiscardedInfs"},
        "data": {"batch_size": 8, "input": {"shape": [8]}, "labels": {"classes": 4}},
        "steps": 1,
    }
    found = nonfinite(gradscope.inspect(raw))
    assert found["finding"] == "nonfinite_forward" and found["module"] == "out"
    assert found["op"] == "torch.linear" and found["kind"] == "inf"
    assert "self.out(h.relu())" in found["source"]


def test_t5_fp16_overflow_is_found_at_wo_not_at_the_relative_position_log():
    """huggingface/transformers#5651: T5's ``DenseReluDense.wo`` overflows fp16 and the loss turns NaN.
    Every T5 forward also takes ``log(0) = -inf`` in ``_relative_position_bucket`` and casts it to an
    integer bucket: that Inf never reaches the loss and must not be named."""
    found = nonfinite(gradscope.inspect(lm("t5", args={"overflow": 1e5}, precision="fp16")))
    assert found["finding"] == "nonfinite_forward"
    assert found["module"] == "decoder.block.1.layer.2.DenseReluDense.wo"
    assert found["kind"] == "inf" and found["dtype"] == "float16"
    assert "self.wo(hidden_states)" in found["source"]


def test_healthy_t5_under_fp16_has_no_nonfinite_finding():
    report = gradscope.inspect(lm("t5", precision="fp16"))
    assert not [a for a in report.anomalies if a.kind.startswith("nonfinite")]
    assert all(s.origin is None for s in report.steps)


def test_nan_gradient_made_by_a_hand_written_loss_is_the_loss_s_with_op_and_line():
    """A loss op outside every module (``sqrt`` of squared distances, 0 on the diagonal) makes the NaN
    gradient: it belongs to the loss, not to ``out``, the last module that ran."""
    raw = {
        "model": {"target": "gradscope.zoo:mlp", "args": {"in_features": 8, "hidden": 16, "depth": 2, "classes": 4}},
        "data": {"batch_size": 8, "input": {"shape": [8]}, "labels": {"classes": 4}},
        "loss": {"target": f"{MODELS}:pairwise_distance_loss"},
        "steps": 1,
    }
    found = nonfinite(gradscope.inspect(raw))
    assert found["finding"] == "nonfinite_loss" and found["module"] is None
    assert found["phase"] == "loss" and found["node"] == "PowBackward0" and found["op"] == "Tensor.pow"
    assert "pairwise_distance_loss" in found["source"] and "diff.pow(2)" in found["source"]
