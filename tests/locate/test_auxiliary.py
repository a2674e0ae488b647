"""Analyses beside the statistics (underflow replay, NaN replays) on models that make them hard:
Hugging Face checkpointing in both reentrant modes, torch.compile; what cannot run is skipped with a note."""

import json

import pytest
import torch
from typer.testing import CliRunner

import gradscope
from gradscope import loading
from gradscope.cli import app
from gradscope.config import settings_from_dict
from tests import real_faults
from tests.conftest import TESTS

runner = CliRunner()
MODELS = str(TESTS / "real_faults.py")


def lm(name: str, **top) -> dict:
    base = {
        "model": {"target": f"{MODELS}:{name}", "args": top.pop("args", {})},
        "data": real_faults.tokens(),
        "loss": "output",
        "steps": 1,
    }
    return {**base, **top}


def flushed(raw: dict, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Independently of gradscope: per parameter, the fraction of entries a ``dtype`` step's gradient
    has at zero where an fp32 step's on the same weights, batch and random state holds a value below
    ``dtype``'s smallest normal, and not 1000x below that gradient's largest entry in either step (a
    zero against a residue that far down is the rounding of a sum that cancels)."""
    settings = settings_from_dict(raw)
    model, batch = loading.build_model(settings), loading.build_batch(settings)
    loss_fn, by_model = loading.build_loss(settings), settings.loss.name == "output"
    state = torch.get_rng_state()  # dropout draws the same masks in both steps
    grads = {}
    for low in (dtype, None):
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(state)
        with torch.autocast("cpu", dtype=low, enabled=low is not None):
            loss = loss_fn(loading.call_model(model, batch, by_model), batch.labels)
        loss.backward()
        grads[low] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    fractions = {}
    for name, g in grads[dtype].items():
        full = grads[None][name].abs()
        own = max(full.max(), g.abs().max())
        lost = (g == 0) & (full > 0) & (full < torch.finfo(dtype).tiny) & (full >= 1e-3 * own)
        fractions[name] = float(lost.sum() / g.numel())
    return fractions


@pytest.mark.parametrize(
    "name,checkpointing", [("gpt2", "reentrant"), ("gpt2", "non_reentrant"), ("llama", "reentrant")]
)
def test_hf_gradient_checkpointing_keeps_the_underflow_replay(name, checkpointing, tmp_path):
    """Hugging Face's ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant":
    True})`` made the fp32 replay's ``torch.autograd.grad`` raise (exit 3); reentrant checkpointing
    refuses ``.grad()`` (pytorch/pytorch#125155, NVIDIA/Megatron-LM#2758)."""
    raw = lm(name, args={"checkpointing": checkpointing}, precision="bf16", optimizer={"name": "adamw"})
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))  # JSON is YAML
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["inspect", str(path), "--json", str(out), "--fail-on", "warning"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert not [n for n in report["run"]["notes"] if "skipped" in n]
    measured = report["steps"][0]["underflow"]
    expected = flushed({**raw, "optimizer": None})
    assert measured.keys() == expected.keys()
    assert measured == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
def test_nan_gradient_inside_hf_checkpointing_is_found_at_its_module(checkpointing):
    """pytorch/pytorch#68425: ``torch.where`` gives NaN gradients from the branch it did not take;
    under reentrant checkpointing the block's autograd nodes exist only inside backward, and
    ``torch.autograd.grad`` cannot run through it."""
    report = gradscope.inspect(lm("gpt2_sqrt_gate", args={"checkpointing": checkpointing}))
    (finding,) = [a for a in report.anomalies if a.kind.startswith("nonfinite")]
    assert finding.kind == "nonfinite_gradient" and finding.module == "transformer.h.1.mlp.act"
    assert finding.evidence["op"] == "Tensor.sqrt" and "x.sqrt()" in finding.evidence["source"]


def test_compiled_model_nan_is_located_through_its_eager_original():
    """A ``torch.compile``d model: the step is replayed through ``_orig_mod`` on the same inputs,
    and its parameters keep their own names (no ``_orig_mod.`` prefix)."""
    report = gradscope.inspect(lm("compiled_gpt2_sqrt_gate"))
    (finding,) = [a for a in report.anomalies if a.kind.startswith("nonfinite")]
    assert finding.kind == "nonfinite_gradient" and finding.module == "transformer.h.1.mlp.act"
    assert finding.evidence["op"] == "Tensor.sqrt"
    assert "transformer.wte.weight" in report.steps[0].parameters


def test_an_analysis_the_model_cannot_run_is_skipped_with_a_note(tmp_path):
    raw = {
        "model": {"target": f"{MODELS}:NeedsAutocast"},
        "data": {"batch_size": 8, "input": {"shape": [8]}, "labels": {"classes": 4}},
        "precision": "bf16",
        "steps": 2,
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["inspect", str(path), "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    (note,) = report["run"]["notes"]
    assert "underflow" in note and "skipped" in note and "runs under autocast only" in note
    assert report["steps"][0]["parameters"]["inp.weight"]["grad_norm"] > 0
    assert len(report["steps"]) == 2


def test_compiled_model_in_a_user_loop_is_located_through_its_eager_original():
    torch.manual_seed(0)
    model = real_faults.compiled_gpt2_sqrt_gate()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, real_faults.VOCAB, (2, real_faults.LENGTH))
    with gradscope.watch(model, optimizer=opt) as scope:
        for _ in range(2):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    report = scope.report
    (finding,) = [a for a in report.anomalies if a.kind.startswith("nonfinite")]
    assert finding.kind == "nonfinite_gradient" and finding.module == "transformer.h.1.mlp.act"
    assert finding.evidence["op"] == "Tensor.sqrt"
    assert any("eager original" in note for note in report.run.notes)
