"""One host sync per step: statistics never call .item() per parameter."""

import torch

import gradscope
from gradscope.config import settings_from_dict
from tests.conftest import config

SYNCING = ("item", "tolist", "cpu", "numpy")


def count_syncs(monkeypatch) -> list[str]:
    """The names of the host-syncing tensor methods called from now on (the list fills as they are)."""
    calls: list[str] = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_one_host_transfer_per_step(monkeypatch):
    calls = count_syncs(monkeypatch)
    # 40 layers (82 parameter tensors), three steps, clipping on.
    raw = config("gradscope.zoo:mlp", {"in_features": 8, "depth": 40, "classes": 4}, steps=3, clip={"max_norm": 1.0})
    inspection = gradscope.Inspection(settings_from_dict(raw))
    inspection.run()
    assert calls == ["tolist"] * 3
