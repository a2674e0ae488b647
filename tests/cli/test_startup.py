"""The command starts without torch where it needs none: --help, show and a config error."""

import json
import subprocess
import sys
from pathlib import Path

import gradscope
from tests.conftest import config

# Runs the command in a fresh interpreter and prints whether torch got imported.
_RUN = """
import sys
from gradscope.cli import main
sys.argv = ["gradscope", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
print("torch imported:", "torch" in sys.modules, "exit:", code)
"""


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, "-c", _RUN, *args], capture_output=True, text=True, timeout=120)
    return done.stdout.strip().splitlines()[-1]


def test_help_imports_no_torch() -> None:
    assert _run("--help") == "torch imported: False exit: 0"


def test_show_imports_no_torch(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    gradscope.inspect(config(steps=2)).save(str(path))
    assert _run("show", str(path)).startswith("torch imported: False exit: ")


def test_a_config_error_imports_no_torch(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({**config(steps=2), "stepz": 3}))
    assert _run("inspect", str(bad)) == "torch imported: False exit: 2"


def test_import_gradscope_imports_no_torch() -> None:
    code = "import sys, gradscope; print(gradscope.__version__, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[-1] == "False"
