"""The README's commands run as written: the quick start names what `make demo` runs and files that
exist, the CI job's gradscope step passes on the example it names, and the packaging metadata says MIT."""

import re
import shlex

import pytest
import yaml
from typer.testing import CliRunner

from gradscope.cli import app
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_every_config_the_readme_names_exists():
    named = set(re.findall(r"configs/[\w/]+\.yaml", README))
    assert "configs/faults/deep_sigmoid_mlp.yaml" in named
    example = {"configs/x.yaml"}  # the file named in an example error message
    missing = [p for p in named - example if not (ROOT / p).exists()]
    assert missing == []


def test_quick_start_says_what_make_demo_runs():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n\t\$\(BIN\)/(gradscope [^|]+?)\s*\|\|", makefile, flags=re.M).group(1)
    line = next(x for x in README.splitlines() if x.startswith("make demo"))
    assert recipe in line


def ci_job() -> dict:
    block = re.search(r"## In CI\n.*?```yaml\n(.*?)```", README, flags=re.S).group(1)
    return yaml.safe_load(block)


def test_ci_job_runs_the_gate_and_keeps_its_reports(tmp_path, monkeypatch):
    steps = ci_job()["jobs"]["gradscope"]["steps"]
    command = next(s["run"] for s in steps if str(s.get("run", "")).startswith("gradscope "))
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"
    args = shlex.split(command)[1:]
    assert args[args.index("--fail-on") + 1] == "warning" and "--junit" in args and "--json" in args
    args[1] = str(ROOT / args[1])  # the config, relative to the checkout
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*args, "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert all((tmp_path / path).exists() for path in upload["with"]["path"].split())


def test_pyproject_metadata_and_license_agree():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    assert "License :: OSI Approved :: MIT License" in project["classifiers"]
    assert {"Homepage", "Repository", "Issues"} <= set(project["urls"])
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    minimum = re.search(r">=3\.(\d+)", project["requires-python"]).group(1)
    assert f"Programming Language :: Python :: 3.{minimum}" in project["classifiers"]
