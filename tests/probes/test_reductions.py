"""The per-tensor gradient reductions against torch's own, on tensors large enough to be read in slices."""

import pytest
import torch

from gradscope.probes.reductions import _SLICED_ABOVE, cpu_columns


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_large_tensor_statistics_match_a_direct_computation(dtype):
    torch.manual_seed(0)
    entries = 3 * _SLICED_ABOVE + 7  # several slices and a short last one
    g = torch.randn(entries, dtype=torch.float64)
    g[::5] = 0.0
    g[1::11] = -0.0
    g[-1] = -40.0  # the largest |g|, in the short last slice
    g[entries // 2] = 30.0
    g = g.to(dtype)
    p = torch.randn(entries, dtype=dtype)
    small_g, small_p = torch.randn(4, 3, dtype=dtype), torch.randn(4, 3, dtype=dtype)
    norm, max_abs, nonzero, param_norm = (c.tolist() for c in cpu_columns([g, small_g], [p, small_p], None))
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for i, (grad, param) in enumerate([(g, p), (small_g, small_p)]):
        assert norm[i] == pytest.approx(torch.linalg.vector_norm(grad.to(wide)).item(), rel=1e-5)
        assert max_abs[i] == grad.abs().max().item()
        assert nonzero[i] == (grad != 0).sum().item()
        assert param_norm[i] == pytest.approx(torch.linalg.vector_norm(param.to(wide)).item(), rel=1e-5)
    assert max_abs[0] == 40.0


def test_a_nan_in_one_slice_reaches_the_maximum():
    g = torch.ones(2 * _SLICED_ABOVE + 1)
    g[_SLICED_ABOVE + 3] = float("nan")
    _, max_abs, nonzero, _ = (c.tolist() for c in cpu_columns([g], [g.clone()], None))
    assert max_abs[0] != max_abs[0] and nonzero[0] == g.numel()  # NaN propagates, as aminmax does; NaN != 0
