"""What a person sees on the command line: the verdict last, grouped findings, tables that fit
80 columns without ambiguous names, honest cells, and a help text that reads cleanly."""

import re
from pathlib import Path

from typer.testing import CliRunner

from gradscope.cli import app
from tests.conftest import CONFIGS, TESTS

runner = CliRunner()
FAULTS = CONFIGS / "faults"


def invoke(*args: str, columns: int | None = None, **env: str):
    env = {**env, **({"COLUMNS": str(columns)} if columns else {})}
    return runner.invoke(app, list(args), env=env)


def row(text: str, name: str) -> list[str]:
    """The cells of the table row of parameter ``name``."""
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return re.split(r"\s{2,}", line.strip())


def test_the_verdict_is_the_last_line_after_the_files_written(tmp_path):
    out, junit = tmp_path / "r.json", tmp_path / "j.xml"
    result = invoke("inspect", str(FAULTS / "nan_forward.yaml"), "--json", str(out), "--junit", str(junit))
    lines = result.stdout.rstrip("\n").splitlines()
    assert result.exit_code == 1
    assert lines[-1] == "1 error: nonfinite_forward at blocks.2 (faults.py:23); exit 1"
    assert lines[-2] == f"wrote {out}, {junit}"


def test_clean_run_and_findings_below_fail_on_say_so():
    clean = invoke("inspect", str(CONFIGS / "residual_mlp.yaml"), "--steps", "1")
    assert clean.stdout.rstrip().splitlines()[-1] == "no anomalies found; exit 0"
    saturated = invoke("inspect", str(FAULTS / "saturated_tanh.yaml"))
    last = saturated.stdout.rstrip().splitlines()[-1]
    assert saturated.exit_code == 0
    assert last == "1 warning (below --fail-on error): saturated_activation in 4 layers (zoo.py:63); exit 0"


def test_findings_of_one_kind_and_cause_are_one_group():
    result = invoke("inspect", str(FAULTS / "dead_relu.yaml"))
    assert "1 finding(s) (3 in the JSON report)" in result.stdout
    assert result.stdout.count("ERROR") == 1  # nothing upstream of the head gets a gradient: an error
    assert "dead_relu x3 [blocks.{0-2}.act, step 0]" in result.stdout


def test_layer_table_fits_80_columns_without_ambiguous_names():
    result = invoke("inspect", str(CONFIGS / "transformer_lm.yaml"), "--steps", "1", "--all", columns=80)
    lines = result.stdout.splitlines()
    assert max(len(x) for x in lines) <= 80
    table = lines[next(i for i, x in enumerate(lines) if x.startswith("parameter ")) + 1 :]
    names = [x.split()[0] for x in table if x.startswith(("blocks.", "tok.", "pos.", "ln_f."))]
    assert len(names) == len(set(names)) == 52  # tok.weight (= lm_head.weight) is one row
    assert "blocks.2.attn.qkv.weight" in names and "blocks.2.attn.qkv.bias" in names
    assert not any(n.endswith("…") for n in names)


def test_narrow_terminal_elides_names_in_the_middle_and_keeps_them_distinct():
    result = invoke("inspect", str(CONFIGS / "transformer_lm.yaml"), "--steps", "1", "--all", columns=40)
    lines = result.stdout.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("parameter "))
    names = [x.split()[0] for x in lines[start + 1 :] if x[:1].isalpha() and not x.startswith("no anomalies")]
    elided = [n for n in names if "…" in n]
    assert elided and len(set(names)) == len(names)
    assert all(not n.endswith("…") and not n.startswith("…") for n in elided)
    assert "left out to fit 40 columns" in " ".join(result.stdout.split())


def test_all_nan_row_shows_nan_for_max_abs_not_zero():
    result = invoke("inspect", str(FAULTS / "nan_forward.yaml"), columns=140)
    cells = row(result.stdout, "blocks.2.linear.weight")
    assert cells[1:] == ["32x32", "NaN", "NaN", "NaN", "0.0", "1024 NaN"]


def test_backward_error_step_has_no_gradient_norm_rather_than_nan():
    result = invoke("inspect", str(FAULTS / "backward_error.yaml"))
    step = next(x for x in result.stdout.splitlines() if re.match(r"\s+0\s+\d", x))
    assert step.split()[-2:] == ["no", "grad"] and "NaN" not in step
    assert "no gradients (backward raised before any gradient arrived)" in result.stdout


def test_long_run_shows_first_last_and_flagged_steps(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(
        "model: {target: gradscope.zoo:mlp, args: {in_features: 8, hidden: 8, depth: 1, classes: 4}}\n"
        "data: {batch_size: 8, input: {shape: [8]}, labels: {classes: 4}}\n"
        "optimizer: {name: sgd, lr: 0.01}\nsteps: 40\n"
    )
    short = invoke("inspect", str(path)).stdout
    assert "per step (10 of 40 shown: first, last and flagged)" in short
    assert re.search(r"^\s*5-34\s+30 steps not shown\s*$", short, flags=re.M)  # which steps the gap holds
    full = invoke("inspect", str(path), "--all").stdout
    assert "30 steps" not in full and re.search(r"^\s+20\s", full, flags=re.M)


def test_no_progress_line_when_stderr_is_not_a_terminal():
    result = invoke("inspect", str(FAULTS / "dead_relu.yaml"), "--steps", "2")
    assert "\r" not in result.stderr and "step 1/2" not in result.stderr


def test_missing_baseline_says_to_write_it_first(tmp_path):
    missing = tmp_path / "base.json"
    result = invoke("inspect", str(CONFIGS / "residual_mlp.yaml"), "--steps", "1", "--baseline", str(missing))
    assert result.exit_code == 2
    assert f"{missing} does not exist: write it first with --update-baseline" in result.stderr


def test_help_is_plain_and_lists_exit_codes():
    result = invoke("inspect", "--help", columns=80)
    text = result.stdout
    assert result.exit_code == 0
    assert "<bool>" not in text and "{" not in text
    assert "inspect [OPTIONS] CONFIG" in text
    assert "error, warning, info or never" in " ".join(text.split())
    assert max(len(x) for x in text.splitlines()) <= 80
    for code in ("0 ", "1 ", "2 ", "3 ", "130 "):
        assert re.search(rf"^\s+{code}\s*\S", text, flags=re.M), code
    wide = invoke("inspect", "--help", columns=200).stdout
    # The docstring's own line breaks are reflowed, not kept mid-sentence.
    assert "--distributed ddp) every rank runs its slice of the batch" in wide


def test_help_offers_shell_completion():
    text = invoke("--help").stdout
    assert "--install-completion" in text and "--show-completion" in text
    assert "<bool>" not in text
    assert "Run a config's model and report its gradients." in text


def test_show_help_names_its_argument():
    assert "show [OPTIONS] REPORT.json" in invoke("show", "--help").stdout


def test_model_error_gets_a_github_annotation_at_the_users_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        f"model: {{target: '{TESTS / 'models.py'}:Raises', args: {{fail_in: init}}}}\ndata: {{input: {{shape: [8]}}}}\n"
    )
    result = invoke("inspect", str(path), GITHUB_ACTIONS="true")
    assert result.exit_code == 2
    command = next(x for x in result.stderr.splitlines() if x.startswith("::error "))
    line = next(i for i, x in enumerate(Path(TESTS / "models.py").read_text().splitlines(), 1) if "bad width 7" in x)
    assert "models.py" in command and f"line={line}," in command and "bad width 7" in command
