"""An error PyTorch raises in backward is placed at modules: the in-place op's and the saving node's."""

import gradscope
from tests.conftest import TESTS

MODELS = str(TESTS / "real_faults.py")


def test_inplace_residual_names_the_module_that_changed_the_saved_tensor_and_the_one_that_saved_it():
    """iMED-Lab/ER-Net#3: ``out += residual`` after a ReLU raises "modified by an inplace operation ...
    output 0 of ReluBackward0" in backward."""
    raw = {
        "model": {"target": f"{MODELS}:InplaceResidual"},
        "data": {"batch_size": 8, "input": {"shape": [8]}, "labels": {"classes": 4}},
        "steps": 1,
    }
    (finding,) = gradscope.inspect(raw).anomalies
    assert finding.kind == "backward_error" and finding.module == "blocks.1"
    e = finding.evidence
    assert e["node"] == "ReluBackward0" and e["module"] == "blocks.1.body.1"
    assert e["modified_by"] == "Tensor.add_" and e["modified_in"] == "blocks.1"
    assert "out += x" in e["modified_at"]
    assert "changed in place by Tensor.add_ in blocks.1" in finding.message


def test_inplace_change_outside_every_module_is_the_loss_s():
    """The sigmoid's output is changed in place after the model (in the loss)."""
    raw = {
        "model": {"target": "gradscope.zoo:mlp", "args": {"in_features": 8, "hidden": 16, "depth": 2, "classes": 4}},
        "data": {"batch_size": 8, "input": {"shape": [8]}, "labels": {"classes": 4}},
        "loss": {"target": f"{MODELS}:inplace_sigmoid_loss"},
        "steps": 1,
    }
    (finding,) = gradscope.inspect(raw).anomalies
    assert finding.kind == "backward_error" and finding.module is None
    assert finding.evidence["modified_by"] == "Tensor.mul_" and "modified_in" not in finding.evidence
    assert "outside every module (the loss)" in finding.message and "probs.mul_(2)" in finding.message
