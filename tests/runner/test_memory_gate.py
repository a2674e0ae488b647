"""The memory gate on the command line: --baseline fails a change that grows a block's saved
activations, --memory-budget fails a run over it, and bad budgets or candidate names are exit 2
with the key path (and the config's file:line)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import gradscope
from gradscope.cli import app
from tests import memory_models as mm
from tests.probes.test_memory import _memory_hooks
from tests.trainer_setup import fresh_accelerate  # noqa: F401 (a fixture)

runner = CliRunner()
CONFIG = """\
model:
  target: tests.memory_models:widening
  args: {{doubled: {doubled}}}
data: {{batch_size: 4, input: {{shape: [3, 16, 16]}}, labels: {{classes: 10}}}}
optimizer: {{name: sgd, lr: 0.01}}
steps: 1
{extra}"""


def write(tmp_path, name: str, doubled: int | None = None, extra: str = "") -> str:
    path = tmp_path / name
    path.write_text(CONFIG.format(doubled="null" if doubled is None else doubled, extra=extra))
    return str(path)


def inspect(*args: str):
    return runner.invoke(app, ["inspect", *args])


def test_a_block_that_saves_twice_as_much_fails_the_baseline_and_the_same_model_passes(tmp_path):
    base = str(tmp_path / "base.json")
    assert inspect(write(tmp_path, "a.yaml"), "--baseline", base, "--update-baseline").exit_code == 0
    assert json.loads((tmp_path / "base.json").read_text())["memory"]["saved_bytes"] > 0
    same = inspect(write(tmp_path, "a.yaml"), "--baseline", base)
    assert same.exit_code == 0 and "memory_growth" not in same.output
    out = tmp_path / "r.json"
    grown = inspect(write(tmp_path, "b.yaml", doubled=2), "--baseline", base, "--json", str(out))
    assert grown.exit_code == 1
    finding = next(a for a in json.loads(out.read_text())["anomalies"] if a["kind"] == "memory_growth")
    assert finding["severity"] == "error" and finding["module"].startswith("blocks.2")
    then, now = finding["evidence"]["blocks.2"]["baseline"], finding["evidence"]["blocks.2"]["now"]
    assert now > 1.8 * then  # twice the convs: about twice the saved bytes
    assert "blocks.0" not in finding["evidence"]  # the other blocks did not grow


def test_growth_below_the_threshold_in_checks_passes(tmp_path):
    base = str(tmp_path / "base.json")
    inspect(write(tmp_path, "a.yaml"), "--baseline", base, "--update-baseline")
    relaxed = inspect(write(tmp_path, "b.yaml", doubled=2), "--baseline", base, "--check", "memory_growth.factor=3")
    assert "memory_growth" not in relaxed.output


@pytest.mark.parametrize("budget", ["512MiB", "6GB", "6GiB"])
def test_budgets_with_units_run(tmp_path, budget):
    result = inspect(write(tmp_path, "a.yaml"), "--memory-budget", budget)
    assert result.exit_code == 0, result.output
    assert "fits" in result.output


def test_a_run_over_its_budget_fails_and_says_what_to_checkpoint(tmp_path):
    result = inspect(write(tmp_path, "a.yaml"), "--memory-budget", "1MiB")
    assert result.exit_code == 1
    assert "memory_budget" in result.output and "checkpointing: {modules: [" in result.output


def test_a_budget_below_the_parameters_says_so(tmp_path):
    result = inspect(write(tmp_path, "a.yaml"), "--memory-budget", "1KiB")
    assert result.exit_code == 1
    assert "parameters, gradients and optimizer state alone" in " ".join(result.output.split())


@pytest.mark.parametrize(("budget", "said"), [("6", "give the unit"), ("-1GiB", "positive"), ("6 parsecs", "size")])
def test_bad_budget_on_the_command_line_is_exit_2(tmp_path, budget, said):
    result = inspect(write(tmp_path, "a.yaml"), "--memory-budget", budget)
    assert result.exit_code == 2
    assert "--memory-budget" in result.output and said in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("budget", "said"), [("6", "give the unit"), ("-512MiB", "positive"), ("6 parsecs", "size")])
def test_bad_budget_in_the_config_is_exit_2_at_its_line(tmp_path, budget, said):
    path = write(tmp_path, "a.yaml", extra=f"memory:\n  budget: {budget}\n")
    result = inspect(path)
    assert result.exit_code == 2
    assert "memory.budget" in result.output and f"{path}:8" in result.output and said in result.output
    assert "Traceback" not in result.output


def test_a_candidate_matching_no_module_is_exit_2_at_its_line(tmp_path):
    path = write(tmp_path, "a.yaml", extra="memory:\n  candidates: [blocks.0, encoder.*]\n")
    result = inspect(path)
    assert result.exit_code == 2
    assert "memory.candidates[1]" in result.output and "encoder.*" in result.output and f"{path}:8" in result.output
    assert "Traceback" not in result.output


def test_named_candidates_join_the_advice(tmp_path):
    path = write(tmp_path, "a.yaml", extra="memory:\n  candidates: [stem, blocks.2.convs.0]\n")
    report = gradscope.inspect(path)
    assert report.memory.modules["blocks.2.convs.0"].candidate and report.memory.modules["stem"].candidate


@pytest.mark.usefixtures("fresh_accelerate")
def test_the_hugging_face_callback_takes_the_memory_probe_under_gradient_checkpointing(tmp_path):
    from gradscope.integrations.transformers import GradscopeCallback
    from tests.integrations.test_transformers import gpt2, trainer

    model = gpt2()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    callback = GradscopeCallback(probes=("memory",))
    run = trainer(tmp_path, model, callback, optim="adamw_torch")
    run.train()
    memory = callback.report.memory
    blocks = ["transformer.h.0", "transformer.h.1"]
    assert memory.step == 0 and all(memory.modules[b].checkpointed for b in blocks)
    assert memory.optimizer_bytes and memory.optimizer_bytes["float32"] > 2 * memory.parameter_bytes["float32"] * 0.9
    hooks = [h for m in model.modules() for h in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]]
    assert not [h for h in hooks if getattr(h, "__module__", "").startswith("gradscope")]  # HF's own may stay
    assert not _memory_hooks(model)


def test_lightning_callback_takes_the_memory_probe(tmp_path):
    import lightning as L

    from gradscope.integrations.lightning import GradscopeCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mm.widening()

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))
    callback = GradscopeCallback(probes=("memory",))
    fit = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        accelerator="cpu",
    )
    fit.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    assert callback.report.memory.modules["net.blocks.4"].saved_bytes > 0


def test_show_prints_the_memory_section_of_a_saved_report(tmp_path):
    out = tmp_path / "r.json"
    first = inspect(write(tmp_path, "a.yaml"), "--memory-budget", "1MiB", "--json", str(out))
    shown = runner.invoke(app, ["show", str(out)])
    assert shown.exit_code == first.exit_code == 1
    section = shown.output[shown.output.index("memory, step 0") :]
    assert "saved for backward" in section and "checkpointing: {modules: [" in section
    assert section.splitlines()[:12] == first.output[first.output.index("memory, step 0") :].splitlines()[:12]
