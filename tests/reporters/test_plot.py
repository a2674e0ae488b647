"""The gradient-flow picture marks what matters: NaN/Inf and zero layers, findings, and long runs
coloured by step with a colour bar and a layer x step heat map."""

import math

import pytest

import gradscope
from gradscope.reporters.plot import figure
from tests.conftest import CONFIGS

matplotlib = pytest.importorskip("matplotlib")
FAULTS = CONFIGS / "faults"


def marks(fig) -> dict[str, int]:
    """The state markers of the flow panel, by label: how many layers each marks."""
    flow = fig.axes[0]
    return {c.get_label().split(" (")[0]: len(c.get_offsets()) for c in flow.collections if "layers" in c.get_label()}


@pytest.fixture(autouse=True)
def close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def render(path, **top):
    return figure(gradscope.inspect(gradscope.load_config(path, top)))


def test_nan_layers_are_marked():
    fig = render(FAULTS / "nan_forward.yaml")
    assert marks(fig) == {"NaN/Inf": 5}
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert "nonfinite_forward" in labels


def test_dead_relu_layers_are_marked_zero_and_the_finding_drawn():
    fig = render(FAULTS / "dead_relu.yaml")
    assert marks(fig) == {"zero": 5}
    assert [t.get_text() for t in fig.axes[0].texts].count("dead_relu") == 3


def test_healthy_run_has_lines_and_no_marks():
    fig = render(CONFIGS / "residual_mlp.yaml", steps=3)
    flow = fig.axes[0]
    assert marks(fig) == {}
    assert len(flow.get_lines()) == 3 and flow.get_yscale() == "log"
    assert flow.get_legend() is not None  # few steps: a legend names them


def test_long_run_is_coloured_by_step_with_a_colour_bar_and_a_heat_map():
    fig = render(FAULTS / "zero_init.yaml", steps=12)
    titles = [ax.get_title() for ax in fig.axes] + [ax.get_ylabel() for ax in fig.axes]
    assert "step" in titles  # the colour bar of the flow panel
    heat = next(ax for ax in fig.axes if ax.get_title().startswith("gradient norm per layer and step"))
    (mesh,) = heat.collections  # every step recorded: one block of cells
    data = mesh.get_array().reshape(5, 12)
    # Every gradient is zero: drawn under the colour range (black), none as NaN (red).
    assert not any(math.isnan(v) for v in data.filled(0).ravel()) and (data < mesh.norm.vmin).all()
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["zero (5 layers)"]  # no per-step entries
