from pathlib import Path
from typing import Any

import pytest
import torch

from gradscope import loading
from gradscope.config import Settings, settings_from_dict

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CONFIGS = ROOT / "configs"


# Variables a CI machine or a developer's shell may set that change what gradscope or rich writes:
# GitHub's annotations and job summary (the suite must not write into the job's own summary), forced
# colour and terminal, a fixed width. A test that wants one sets it itself.
MACHINE_ENV = ("GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS")


@pytest.fixture(autouse=True)
def _no_machine_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in MACHINE_ENV:
        monkeypatch.delenv(name, raising=False)


def target(name: str) -> str:
    """A target naming a class in tests/models.py."""
    return f"{TESTS / 'models.py'}:{name}"


def config(model: str = "gradscope.zoo:mlp", args: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """A small valid config dict; keyword arguments replace top-level keys."""
    if args is None and model == "gradscope.zoo:mlp":
        args = {"in_features": 8, "hidden": 16, "depth": 2, "classes": 4}
    base: dict[str, Any] = {
        "model": {"target": model, "args": args or {}},
        "data": {"batch_size": 8, "input": {"shape": [8]}, "labels": {"classes": 4}},
        "steps": 1,
    }
    base.update(top)
    return base


def reference_grads(settings: Settings, scale: bool = False) -> dict[str, torch.Tensor]:
    """Gradients of one plain step, computed without gradscope, keyed by parameter name."""
    model = reference_model(settings, scale)
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def reference_model(settings: Settings, scale: bool = False) -> torch.nn.Module:
    """The config's model after one plain forward/backward (grads unscaled when ``scale``)."""
    model = loading.build_model(settings)
    batch = loading.build_batch(settings)
    loss_fn = loading.build_loss(settings)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        output = loading.call_model(model, batch, settings.loss.name == "output")
        loss = loss_fn(output, batch.labels)
    if scale:
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(loss).backward()
        inv = 1.0 / scaler.get_scale()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(inv)
        return model
    loss.backward()
    return model


def norm64(t: torch.Tensor) -> float:
    return torch.linalg.vector_norm(t, dtype=torch.float64).item()


@pytest.fixture
def settings_of():
    return settings_from_dict
