"""Data that does not fit the model: token ids beyond the embedding and sequences longer than the
position table are named (input, largest id or length, the table), not a bare IndexError; labels
equal to the inputs for a loss that does not shift them are warned about."""

import json

import yaml
from typer.testing import CliRunner

from gradscope.cli import app
from tests.conftest import CONFIGS

runner = CliRunner()


def _config(tmp_path, raw: dict) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def _lm(vocab: int, length: int) -> dict:
    return {
        "model": {
            "target": "gradscope.zoo:transformer_lm",
            "args": {"vocab": 256, "d_model": 32, "n_layers": 1, "n_heads": 2, "max_len": 32},
        },
        "data": {"batch_size": 4, "input": {"tokens": {"vocab": vocab, "length": length}}, "labels": "next_token"},
    }


def _first_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output.splitlines()[0]


def test_token_ids_beyond_the_embedding_name_the_input_its_largest_id_and_the_table(tmp_path):
    """``vocab: 512`` for a 256-row embedding ended in "IndexError: index out of range in self"."""
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["inspect", _config(tmp_path, _lm(512, 32)), "--json", str(out)])
    line = _first_line(result)
    assert "c.yaml:" in line and "data.input.tokens.vocab" in line
    assert "index out of range in self" not in line
    assert "tok, has 256 rows" in line and "go up to 5" in line  # the largest id drawn from 512
    assert "keep the ids below 256" in line


def test_a_sequence_longer_than_gpt2_positions_names_the_position_table(tmp_path):
    raw = yaml.safe_load((CONFIGS / "hf_gpt2.yaml").read_text())
    raw["data"]["input"]["tokens"]["length"] = 128  # n_positions is 64
    line = _first_line(runner.invoke(app, ["inspect", _config(tmp_path, raw)]))
    assert "data.input.tokens.length" in line
    assert "128 tokens long" in line and "transformer.wpe holds 64 positions" in line


def test_token_ids_beyond_gpt2_vocabulary_name_its_token_embedding(tmp_path):
    raw = yaml.safe_load((CONFIGS / "hf_gpt2.yaml").read_text())
    raw["data"]["input"]["tokens"]["vocab"] = 1000  # vocab_size is 256
    line = _first_line(runner.invoke(app, ["inspect", _config(tmp_path, raw)]))
    assert "data.input.tokens.vocab" in line and "transformer.wte, has 256 rows" in line


def test_labels_equal_to_the_inputs_with_cross_entropy_are_warned_about(tmp_path):
    """``labels: input`` with the built-in cross_entropy trains each position to predict its own token."""
    raw = _lm(256, 32)
    raw["data"]["labels"] = "input"
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["inspect", _config(tmp_path, raw), "--json", str(out)])
    assert result.exit_code in (0, 1), result.output
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "data.labels" in warning[0] and "c.yaml:" in warning[0]
    assert "next_token" in warning[0]
    assert any(note.startswith("data.labels") for note in json.loads(out.read_text())["run"]["notes"])


def test_labels_equal_to_the_inputs_of_a_model_that_shifts_them_are_not_warned_about(tmp_path):
    """configs/hf_gpt2.yaml: GPT2LMHeadModel shifts ``labels`` itself (loss: output)."""
    result = runner.invoke(app, ["inspect", str(CONFIGS / "hf_gpt2.yaml")])
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.stderr
