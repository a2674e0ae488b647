"""Property: whatever a user writes into an example config or onto the command line, gradscope
ends with exit 0, 1 or 2, prints no traceback without -v, names a key, file or option when it
refuses, and finishes in bounded time."""

import copy
import re
import time

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gradscope.cli import app
from tests.conftest import CONFIGS

runner = CliRunner()
EXAMPLES = ["residual_mlp.yaml", "lstm.yaml", "custom_model.yaml", "faults/dead_relu.yaml"]
SEEN: list[int] = []
SECONDS = 30  # per run; a tiny model with one step takes about one


def _tiny(name: str) -> dict:
    raw = yaml.safe_load((CONFIGS / name).read_text())
    raw["steps"] = 1
    raw.pop("checkpointing", None)
    args = raw["model"].get("args", {})
    for key in ("depth", "layers"):
        if key in args:
            args[key] = min(args[key], 2)
    return raw


BASES = {name: _tiny(name) for name in EXAMPLES}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1, 3, 2**63, 10**20, 0.0, -0.5, 1e-8, 1e300, float("inf"), float("nan")]),
    st.text(alphabet="abc.:/_-[]{}é 0123456789", max_size=12),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.sampled_from(["a", "name", "target"]), scalars, max_size=2),
)


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(EXAMPLES))
    raw = copy.deepcopy(BASES[name])
    for _ in range(draw(st.integers(0, 2))):
        paths = _paths(raw)
        path = draw(st.sampled_from(paths))
        parent = raw
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["set", "delete", "unknown"]))
        if action == "set" or isinstance(parent, list):
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["colour", "stpes", "lr"]))] = draw(values)
    text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    form = draw(st.sampled_from(["utf-8"] * 5 + ["utf-16", "latin-1", "cut", "dup", "tab"]))
    if form == "cut":
        data = text[: draw(st.integers(0, len(text)))].encode()
    elif form == "dup":
        data = (text + text.splitlines()[0] + "\n").encode()
    elif form == "tab":
        data = text.replace("  ", "\t", 1).encode()
    else:
        data = (text + "# café\n").encode(form)
    return name, data


options = st.lists(
    st.sampled_from(
        [
            ["--steps", "2"],
            ["--fail-on", "never"],
            ["--json", "{tmp}/r.json"],
            ["--device", "cuda:7"],
            ["--device", "tpu"],
            ["--check", "dead_relu.fraction=0.3"],
            ["--check", "dead_relu.fraction=["],
            ["--check", "ignore.kind=x"],
            ["--check", "nope"],
            ["--json", "{tmp}/r.json"],
            ["--json", "-"],
            ["--json", ""],
            ["--json", "{tmp}"],
            ["--junit", "/proc/j.xml"],
            ["--plot", "{tmp}/flow.xyz"],
            ["--logdir", "{tmp}/cfg.yaml"],
            ["--baseline", "{tmp}/missing.json"],
            ["--fail-on", "warning"],
            ["--distributed", "none"],
        ]
    ),
    max_size=2,
)

NAMED = re.compile(r"\.yaml|\.json|--[a-z]|[a-z_]+(\.[a-z_\[\]0-9]+)*:|\.py")


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=mutated(), extra=options)
def test_any_mutated_config_ends_in_0_1_or_2_with_a_named_cause(case, extra, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    name, data = case
    path = tmp / "cfg.yaml"
    path.write_bytes(data)
    if name == "custom_model.yaml":
        (tmp / "custom").mkdir()
        (tmp / "custom" / "model.py").write_bytes((CONFIGS / "custom" / "model.py").read_bytes())
    args = [a.replace("{tmp}", str(tmp)) for option in extra for a in option]
    start = time.perf_counter()
    result = runner.invoke(app, ["inspect", str(path), *args])
    took = time.perf_counter() - start
    SEEN.append(result.exit_code)
    assert result.exit_code in (0, 1, 2), result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert took < SECONDS
    if result.exit_code == 2:
        line = next(line for line in result.output.splitlines() if "error:" in line)
        assert NAMED.search(line.split("error:", 1)[1]), line


def test_the_fuzz_bases_run_clean(tmp_path):
    # The unmutated configs pass, so a failure above is the mutation's, not the base's.
    for name in ("residual_mlp.yaml", "lstm.yaml"):
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(BASES[name]))
        assert runner.invoke(app, ["inspect", str(path)]).exit_code in (0, 1)
