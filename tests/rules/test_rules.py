"""Diagnoses: every faulty example is found at its place; healthy models raise nothing."""

import json
import re

import pytest
from typer.testing import CliRunner

import gradscope
from gradscope.cli import app
from gradscope.config import settings_from_dict
from gradscope.report import ActivationStats
from tests.conftest import CONFIGS, config, target

runner = CliRunner()
FAULTS = sorted((CONFIGS / "faults").glob("*.yaml"))


def expectations(path) -> list[tuple[str, str]]:
    """``# expect: KIND at MODULE`` lines of a config (MODULE ``-``: anywhere)."""
    return re.findall(r"^# expect: (\w+) at (\S+)$", path.read_text(), flags=re.M)


@pytest.mark.parametrize("path", FAULTS, ids=lambda p: p.name)
def test_fault_is_found_at_its_place(path, tmp_path):
    expected = expectations(path)
    assert expected, f"{path.name} names no expected finding"
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["inspect", str(path), "--json", str(out), "--fail-on", "warning"])
    assert result.exit_code == 1, result.output
    found = json.loads(out.read_text())["anomalies"]
    for kind, module in expected:
        matches = [a for a in found if a["kind"] == kind and (module == "-" or a["module"] == module)]
        assert matches, f"{path.name}: no {kind} at {module}; found {[(a['kind'], a['module']) for a in found]}"
        assert all(a["severity"] in ("error", "warning") for a in matches)
    kinds = {kind for kind, _ in expected}
    assert {a["kind"] for a in found if a["severity"] != "info"} <= kinds, found


def origin_of(raw: dict) -> dict:
    report = gradscope.inspect(raw)
    (finding,) = [a for a in report.anomalies if a.kind.startswith("nonfinite")]
    return {**finding.evidence, "finding": finding.kind, "module": finding.module}


NAN_FORWARD = config(
    "gradscope.faults:NanInForward",
    {"width": 16, "depth": 4, "fault_at": 2},
    data={"batch_size": 8, "input": {"shape": [16]}, "labels": {"classes": 10}},
    steps=3,
    optimizer={"name": "sgd", "lr": 0.1},
)


def test_nan_forward_origin_names_op_line_and_range():
    o = origin_of(NAN_FORWARD)
    assert o["finding"] == "nonfinite_forward" and o["module"] == "blocks.2"
    assert o["op"] == "torch.log" and "faults.py" in o["source"] and "torch.log(self.linear(x))" in o["source"]
    assert o["input_min"] < 0 < o["input_max"]
    assert o["steps_affected"] == [0, 1, 2]  # one finding for the spread over later steps


def test_nan_origin_under_checkpointing():
    o = origin_of({**NAN_FORWARD, "checkpointing": {"modules": ["blocks.*"]}})
    assert o["module"] == "blocks.2" and o["op"] == "torch.log"


def test_nan_origin_under_bf16_autocast():
    o = origin_of({**NAN_FORWARD, "precision": "bf16"})
    assert o["module"] == "blocks.2" and o["op"] == "torch.log"


def test_nan_origin_in_a_module_called_twice():
    raw = config(target("LogOnSecondCall"), data={"batch_size": 8, "input": {"shape": [8]}, "labels": {"classes": 4}})
    o = origin_of(raw)
    assert o["module"] == "shared (call 2 of 2)" and o["op"] == "torch.log"


def test_nan_in_the_batch_is_blamed_on_the_data():
    raw = config(data={"target": f"{target('nan_batch').split(':')[0]}:nan_batch"})
    o = origin_of(raw)
    assert o["finding"] == "nonfinite_loss" and o["phase"] == "input" and list(o["tensors"]) == ["inputs"]


def test_masked_fill_with_minus_inf_is_not_an_origin():
    report = gradscope.inspect(
        config(target("MaskedAttention"), data={"batch_size": 8, "input": {"shape": [6, 8]}, "labels": {"classes": 4}})
    )
    assert report.anomalies == ()


def test_fully_masked_softmax_row_is_the_origin():
    raw = config(
        target("MaskedAttention"),
        {"mask_all_first_row": True},
        data={"batch_size": 8, "input": {"shape": [6, 8]}, "labels": {"classes": 4}},
    )
    o = origin_of(raw)
    assert o["finding"] == "nonfinite_forward" and o["op"] == "torch.softmax" and o["module"] == "(model)"


def test_ignore_entry_accepts_a_finding():
    raw = config(
        target("WithUnused"),
        checks={"ignore": [{"kind": "unused_parameter", "module": "spare", "reason": "kept for export"}]},
    )
    report = gradscope.inspect(raw)
    assert report.anomalies == ()
    assert [a.kind for a in report.ignored] == ["unused_parameter"]


def test_severity_override_and_off():
    raw = config(target("WithUnused"), checks={"unused_parameter": {"severity": "info"}})
    assert [a.severity for a in gradscope.inspect(raw).anomalies] == ["info"]
    raw = config(target("WithUnused"), checks={"unused_parameter": {"severity": "off"}})
    assert gradscope.inspect(raw).anomalies == ()


def test_sparse_embedding_rows_and_layernorm_gains_raise_nothing():
    raw = config(
        "gradscope.zoo:transformer_lm",
        {"vocab": 4096, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_len": 16, "tie_weights": False},
        data={"batch_size": 2, "input": {"tokens": {"vocab": 4096, "length": 16}}, "labels": "next_token"},
        steps=2,
        optimizer={"name": "adamw", "lr": 1e-3},
    )
    report = gradscope.inspect(raw)
    assert report.steps[0].parameters["tok.weight"].zero_fraction > 0.99  # rows not in the batch
    assert report.anomalies == ()


def test_attention_key_bias_that_cancels_in_softmax_raises_nothing():
    report = gradscope.inspect(
        config(target("SeparateKeyBias"), data={"batch_size": 8, "input": {"shape": [6, 8]}, "labels": {"classes": 4}})
    )
    k_bias = report.steps[0].parameters["k.bias"].grad_norm
    assert k_bias < 1e-5 * report.steps[0].parameters["k.weight"].grad_norm
    assert report.anomalies == ()


def test_dead_relu_counts_functional_calls_with_their_line():
    report = gradscope.inspect(
        config(target("FunctionalRelu"), data={"batch_size": 32, "input": {"shape": [8]}, "labels": {"classes": 4}})
    )
    dead = [a for a in report.anomalies if a.kind == "dead_relu"]
    assert len(dead) == 2  # F.relu and x.relu() at two lines
    assert all(a.module == "(model)" and "models.py:" in a.evidence["source"] for a in dead)
    assert {a.evidence["fraction"] for a in dead} == {1.0}


def test_too_few_samples_is_not_called_dead():
    report = gradscope.inspect(
        config(target("FunctionalRelu"), data={"batch_size": 4, "input": {"shape": [8]}, "labels": {"classes": 4}})
    )
    assert [a for a in report.anomalies if a.kind == "dead_relu"] == []


def test_dead_fraction_is_per_unit():
    settings = settings_from_dict(
        config("gradscope.zoo:mlp", {"in_features": 8, "hidden": 16, "depth": 1, "classes": 4, "bias": -100.0})
    )
    report = gradscope.inspect(settings)
    (stats,) = [a for a in report.steps[0].activations.values()]
    assert isinstance(stats, ActivationStats)
    assert stats.kind == "relu" and stats.fraction == 1.0 and stats.units == 16 and stats.samples == 8


def test_fp16_forward_overflow_is_located_with_the_bf16_hint():
    raw = config(target("Fp16Overflow"), precision="fp16")
    report = gradscope.inspect(raw)
    (finding,) = [a for a in report.anomalies if a.severity == "error"]
    assert finding.kind == "nonfinite_forward" and finding.module == "big"
    assert finding.evidence["dtype"] == "float16" and "bf16" in finding.message
    assert not [a for a in report.anomalies if a.kind == "loss_scale_overflow"]  # one fault, one finding


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resnet_with_batchnorm_is_clean(precision):
    raw = config(
        "gradscope.zoo:resnet",
        {"in_channels": 3, "width": 8, "stages": [2, 2], "classes": 10},
        data={"batch_size": 16, "input": {"shape": [3, 16, 16]}, "labels": {"classes": 10}},
        steps=3,
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
        precision=precision,
    )
    assert gradscope.inspect(raw).anomalies == ()
