"""``--json /dev/stdout`` run by an ordinary user: the descriptor it inherited is written in place.

An ordinary user may not open, by its path, a pipe or a file another user made (``/dev/stdout``
is ``/proc/self/fd/1``), and may not put a temporary file into ``/dev``; yet the descriptor the
shell handed over writes there. Run as ``nobody`` through ``setpriv`` in a subprocess; skipped
where no user switch or no interpreter that user can run is available.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

TINY = """model: {target: gradscope.zoo:mlp, args: {in_features: 8, hidden: 16, depth: 2, classes: 4}}
data: {batch_size: 8, input: {shape: [8]}, labels: {classes: 4}}
steps: 1
"""


def _as_nobody() -> tuple[list[str], dict[str, str]]:
    """The command prefix that runs a gradscope as ``nobody``, and its environment."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run a command as an ordinary user")
    prefix = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    home = tempfile.mkdtemp(prefix="gradscope-nobody-")
    os.chmod(home, 0o777)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": home,
        "MPLCONFIGDIR": home,
        "PYTHONPATH": os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]]),
    }
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, shutil.which(version), f"/usr/bin/{version}"):
        if (
            python
            and subprocess.run([*prefix, python, "-c", "import torch, typer"], env=env, capture_output=True).returncode
            == 0
        ):
            return [*prefix, python, "-m", "gradscope"], env
    pytest.skip(f"no {version} that the user nobody can run with this environment's packages")


@pytest.fixture
def readable_config() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="gradscope-config-"))
    os.chmod(folder, 0o755)
    path = folder / "tiny.yaml"
    path.write_text(TINY)
    os.chmod(path, 0o644)
    yield path
    shutil.rmtree(folder)


def _check_report(text: str) -> None:
    report = json.loads(text)
    assert report["schema_version"] == 1 and report["run"]["steps_completed"] == 1


def test_json_to_dev_stdout_as_an_ordinary_user_writes_the_inherited_pipe(readable_config):
    command, env = _as_nobody()
    result = subprocess.run(
        [*command, "inspect", str(readable_config), "--json", "/dev/stdout"], env=env, capture_output=True, timeout=300
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    _check_report(result.stdout.decode())  # the report alone: the terminal text went to stderr
    assert "exit 0" in result.stderr.decode()


def test_json_to_dev_stdout_as_an_ordinary_user_keeps_the_shells_file(readable_config, tmp_path):
    """``> out.json`` made by another user (root): the user cannot open it by path, nor replace it."""
    command, env = _as_nobody()
    out = tmp_path / "out.json"
    with open(out, "wb") as f:
        os.chmod(out, 0o644)
        result = subprocess.run(
            [*command, "inspect", str(readable_config), "--json", "/dev/stdout"],
            env=env,
            stdout=f,
            stderr=subprocess.PIPE,
            timeout=300,
        )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    _check_report(out.read_text())


def test_json_to_dev_stderr_as_an_ordinary_user(readable_config):
    command, env = _as_nobody()
    result = subprocess.run(
        [*command, "inspect", str(readable_config), "--json", "/dev/stderr"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    text = result.stderr.decode()
    _check_report(text[text.index("{\n") : text.rindex("}\n") + 2])
