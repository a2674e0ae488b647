"""YAML a user can write that the loader must refuse in one line, exit 2: encodings, nesting,
alias bombs, duplicate keys, and ``--check`` values."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradscope.checks import parse_check_options
from gradscope.cli import app
from gradscope.config import load_config, merge

runner = CliRunner()

TINY = """model: {target: gradscope.zoo:mlp, args: {in_features: 4, hidden: 4, depth: 2, classes: 2}}
data: {batch_size: 4, input: {shape: [4]}, labels: {classes: 2}}
steps: 1
"""


def inspect(path: Path, *args: str):
    return runner.invoke(app, ["inspect", str(path), *args])


def one_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output.splitlines()[0]


def bomb(levels: int = 9) -> str:
    text = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels):
        text += f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join(['*' + chr(96 + i)] * 9)}]\n"
    return text


CASES = {
    "latin1_byte_in_a_comment": (TINY.encode() + b"# caf\xe9\n", "line 4: not valid utf-8 (byte 0xe9"),
    "utf16_without_bom": (TINY.encode("utf-16-le"), "UTF-16 or UTF-32 without a byte-order mark"),
    "flow_list_nested_3000_deep": ((TINY + "x: " + "[" * 3000 + "]" * 3000 + "\n").encode(), "nesting depth"),
    "block_list_nested_300_deep": (
        (TINY + "x:\n" + "".join(" " * i + "-\n" for i in range(1, 300))).encode(),
        "x: nested more than 100 levels deep",
    ),
    "billion_laughs": ((TINY + bomb()).encode(), "expands to more than"),
    "key_given_twice": ((TINY + "steps: 2\n").encode(), "cfg.yaml:3: steps: given twice, on lines 3 and 4"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_yaml_the_loader_chokes_on_is_exit_2(case, tmp_path):
    data, expected = CASES[case]
    path = tmp_path / "cfg.yaml"
    path.write_bytes(data)
    line = one_error(inspect(path))  # the depth and size limits name themselves: no wait on a clock
    assert expected in line and str(path) in line


def test_utf16_and_utf8_bom_configs_are_read(tmp_path):
    for encoding in ("utf-16", "utf-8-sig", "utf-32"):
        path = tmp_path / f"{encoding}.yaml"
        path.write_bytes(TINY.encode(encoding))
        assert load_config(path).steps == 1


def test_exponent_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 reads 1e-8 as a string; the optimizer's eps must get the float.
    path = tmp_path / "cfg.yaml"
    path.write_text(TINY + "optimizer: {name: adam, eps: 1e-8}\n")
    assert load_config(path).optimizer.kwargs["eps"] == 1e-8


def test_one_megabyte_config_loads_whole(tmp_path):
    ignores = "".join(f"    - {{kind: dead_relu, module: m{i}, reason: known}}\n" for i in range(20000))
    path = tmp_path / "cfg.yaml"
    path.write_text(TINY + "checks:\n  ignore:\n" + ignores)
    assert path.stat().st_size > 1e6
    ignore = load_config(path).checks.ignore
    assert len(ignore) == 20000 and ignore[-1].module == "m19999"


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("dead_relu.fraction=[", "--check dead_relu.fraction=[: the value is not valid YAML"),
        ("dead_relu.fraction=!!python/object:os.system x", "could not determine a constructor"),
        ("ignore.kind=dead_relu", "--check ignore.kind=dead_relu: --check sets thresholds"),
        ("dead_relu.fraction=2", "--check dead_relu.fraction=2: Input should be less than or equal to 1"),
        ("dead_relu.nope=1", "dead_relu has no 'nope'; expected one of: severity"),
        ("nope.x=1", "unknown check 'nope'"),
    ],
)
def test_bad_check_option_names_the_option(option, expected, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(TINY)
    assert expected in one_error(inspect(path, "--check", option))


def test_check_option_merges_with_the_files_checks(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(TINY + "checks: {dead_relu: {min_samples: 4}, vanishing_gradient: {ratio: 0.01}}\n")
    result = inspect(path, "--check", "dead_relu.fraction=0.3", "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    merged = merge(
        {"checks": {"dead_relu": {"min_samples": 4}}}, {"checks": parse_check_options(["dead_relu.fraction=0.3"])}
    )
    assert merged == {"checks": {"dead_relu": {"min_samples": 4, "fraction": 0.3}}}
