"""Config validation and target resolution, below the CLI."""

import pytest

from gradscope.config import load_config, settings_from_dict
from gradscope.errors import ConfigError, user_frame
from gradscope.inspection import Inspection
from tests.conftest import config


def test_line_numbers_point_at_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "seed: 0\nmodel:\n  target: gradscope.zoo:mlp\n  args:\n    depth: 2\ndata:\n  input: {shape: [-4]}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:7: data.input.shape" in str(info.value)


def test_every_problem_is_listed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {target: gradscope.zoo:mlp}\ndata: {input: {shape: [8]}}\nsteps: 0\nprecision: fp8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert {p for p, _ in info.value.problems} == {"steps", "precision"}


def test_data_needs_one_source():
    with pytest.raises(ConfigError, match="`target` builds the batch itself"):
        settings_from_dict(config(data={"target": "x.py:f", "batch_size": 4}))
    with pytest.raises(ConfigError, match="exactly one of"):
        settings_from_dict(config(data={"input": {"shape": [4], "tokens": {"vocab": 3, "length": 2}}}))


def test_next_token_labels_shift_the_inputs():
    raw = config(
        "gradscope.zoo:transformer_lm",
        {"vocab": 16, "d_model": 8, "n_layers": 1, "n_heads": 2, "max_len": 4},
        data={"batch_size": 2, "input": {"tokens": {"vocab": 16, "length": 4}}, "labels": "next_token"},
    )
    batch = Inspection(settings_from_dict(raw)).batch
    assert (batch.labels[:, :-1] == batch.inputs[:, 1:]).all()
    assert (batch.labels[:, -1] == -100).all()


def test_nested_targets_are_built_first():
    pytest.importorskip("transformers")
    raw = config(
        "transformers:GPT2LMHeadModel",
        {
            "config": {
                "target": "transformers:GPT2Config",
                "args": {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 32},
            }
        },
    )
    model = Inspection(settings_from_dict(raw)).model
    assert model.config.n_layer == 1 and model.config.vocab_size == 32


def test_dotted_target_without_colon():
    raw = config("gradscope.zoo.mlp", {"in_features": 8, "classes": 4})
    assert type(Inspection(settings_from_dict(raw)).model).__name__ == "MLP"


def test_user_frame_skips_library_frames():
    def users_code():
        import torch

        torch.zeros(2) @ torch.zeros(3)

    try:
        users_code()
    except RuntimeError as exc:
        assert f"{__file__}" in user_frame(exc) and "users_code" in user_frame(exc)


def test_torchvision_model_without_weights():
    try:
        import torchvision  # noqa: F401
    except Exception:  # not installed, or built for another torch
        pytest.skip("torchvision is not importable here")
    raw = config(
        "torchvision.models:resnet18",
        {"weights": None, "num_classes": 4},
        data={"batch_size": 2, "input": {"shape": [3, 32, 32]}, "labels": {"classes": 4}},
    )
    report = Inspection(settings_from_dict(raw)).run()
    assert report.steps[0].parameters["conv1.weight"].grad_norm > 0
