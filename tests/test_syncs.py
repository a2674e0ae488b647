"""One host sync per step: statistics never call .item() per parameter."""

import torch

import gradscope
from gradscope.config import settings_from_dict
from tests.conftest import config

SYNCING = ("item", "tolist", "cpu", "numpy")


def test_one_host_transfer_per_step(monkeypatch):
    calls = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    # 40 layers (82 parameter tensors), three steps, clipping on.
    raw = config("gradscope.zoo:mlp", {"in_features": 8, "depth": 40, "classes": 4}, steps=3, clip={"max_norm": 1.0})
    inspection = gradscope.Inspection(settings_from_dict(raw))
    inspection.run()
    assert calls == ["tolist"] * 3
