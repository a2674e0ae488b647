"""CUDA paths: device placement, autocast and the grad scaler on a GPU. Skipped without one."""

import pytest
import torch

import gradscope
from gradscope.config import settings_from_dict
from tests.conftest import config, norm64

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TRANSFORMER = config(
    "gradscope.zoo:transformer_lm",
    {"vocab": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_len": 16},
    data={"batch_size": 4, "input": {"tokens": {"vocab": 64, "length": 16}}, "labels": "next_token"},
)


def cuda_reference(settings, precision):
    from gradscope import loading

    model = loading.build_model(settings).cuda()
    batch = loading.build_batch(settings).to(torch.device("cuda"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        loss = loading.cross_entropy(model(batch.inputs), batch.labels)
    if precision == "fp16":
        scaler = torch.amp.GradScaler("cuda")
        scaler.scale(loss).backward()
        inv = 1.0 / scaler.get_scale()
        return {n: p.grad * inv for n, p in model.named_parameters()}
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_norms_match_plain_pytorch(precision):
    settings = settings_from_dict({**TRANSFORMER, "device": "cuda", "precision": precision})
    report = gradscope.inspect(settings)
    assert report.run.device.startswith("cuda")
    expected = cuda_reference(settings, precision)
    for name, stats in report.steps[0].parameters.items():
        assert stats.grad_norm == pytest.approx(norm64(expected[name]), rel=1e-4), name


def test_auto_picks_cuda():
    report = gradscope.inspect({**TRANSFORMER, "device": "auto"})
    assert report.run.device.startswith("cuda")


def test_no_sync_outside_the_one_transfer():
    # "warn" reports every synchronizing call; the step's single .tolist() is the only one expected.
    settings = settings_from_dict({**TRANSFORMER, "device": "cuda", "steps": 2})
    inspection = gradscope.Inspection(settings)
    calls = []
    original = torch.Tensor.tolist

    def counted(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    torch.Tensor.tolist = counted
    try:
        torch.cuda.set_sync_debug_mode("error")
        with pytest.raises(RuntimeError, match="synchroniz"):
            inspection.run()  # the one transfer per step is a sync: it must be the first one hit
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.Tensor.tolist = original
    assert calls == [1]
