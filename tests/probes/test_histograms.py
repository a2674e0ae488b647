"""Gradient histograms checked against torch.histogram of each gradient's finite entries."""

import math

import pytest
import torch

from gradscope.probes.histograms import BINS, CHUNK, gradient_histograms, to_histogram


def expected(g: torch.Tensor) -> dict:
    finite = g[torch.isfinite(g)].double().flatten()
    nonfinite = g.numel() - finite.numel()
    if not finite.numel():
        return {"count": 0, "nonfinite": nonfinite, "buckets": [0] * BINS}
    lo, hi = finite.min().item(), finite.max().item()
    if lo == hi:
        buckets = [finite.numel()] + [0] * (BINS - 1)
    else:
        buckets = torch.histogram(finite, bins=BINS, range=(lo, hi)).hist.long().tolist()
    return {
        "min": lo,
        "max": hi,
        "count": finite.numel(),
        "nonfinite": nonfinite,
        "sum": finite.sum().item(),
        "squares": finite.square().sum().item(),
        "buckets": buckets,
    }


def check(grads: list[torch.Tensor], exact_buckets: bool) -> None:
    table = gradient_histograms(grads)
    assert table.shape == (len(grads), 6 + BINS)
    for g, row in zip(grads, table.tolist()):
        h, want = to_histogram(row), expected(g)
        assert (h.count, h.nonfinite, sum(h.buckets)) == (want["count"], want["nonfinite"], want["count"])
        if not want["count"]:
            continue
        assert (h.min, h.max) == (want["min"], want["max"])
        assert h.sum == pytest.approx(want["sum"], rel=1e-4, abs=1e-4 * math.sqrt(want["squares"]))
        assert h.sum_squares == pytest.approx(want["squares"], rel=1e-4)
        if exact_buckets:
            assert list(h.buckets) == want["buckets"]


def test_many_small_gradients_share_chunks_and_match_one_by_one():
    torch.manual_seed(0)
    grads = [torch.randn(16, 16, dtype=torch.float64) * (i + 1) for i in range(300)] + [
        torch.randn(7) for _ in range(5)
    ]
    check(grads, exact_buckets=False)
    check(grads[:300], exact_buckets=True)


def test_a_gradient_spanning_several_chunks_is_one_histogram():
    torch.manual_seed(0)
    large = torch.randn(CHUNK * 2 + 1000, dtype=torch.float64)
    large[CHUNK + 5] = 40.0  # the maximum sits in the second chunk: bounds combine across chunks
    large[10] = math.nan
    check([torch.randn(3, 3, dtype=torch.float64), large, torch.randn(50, dtype=torch.float64)], exact_buckets=True)


def test_nonfinite_constant_empty_and_half_precision_gradients():
    grads = [
        torch.tensor([1.0, math.nan, 3.0, math.inf, -math.inf]),
        torch.full((5,), math.nan),
        torch.zeros(0),
        torch.full((7,), 2.5),
        torch.randn(64, 8).bfloat16(),
        torch.tensor([math.inf, -2.0]),
    ]
    check(grads, exact_buckets=False)
    h = to_histogram(gradient_histograms(grads[:1])[0].tolist())
    assert (h.min, h.max, h.count, h.nonfinite, h.buckets[0], h.buckets[-1]) == (1.0, 3.0, 2, 3, 1, 1)
    constant = to_histogram(gradient_histograms([grads[3]])[0].tolist())
    assert constant.buckets[0] == 7 and constant.min == constant.max == 2.5


def test_cpu_path_gives_the_chunked_paths_table_bit_for_bit():
    # The CPU path stacks same-shape gradients and slices large ones; its buckets, bounds and
    # counts must be those of the chunked path (which every other device takes) exactly.
    from gradscope.probes.cpu_histograms import _SLICE, _SMALL
    from gradscope.probes.histograms import _chunked

    torch.manual_seed(0)
    with_nan = torch.randn(40, 40)
    with_nan[3, 7] = math.nan
    grads = (
        [torch.randn(32, 32) * (i + 1) for i in range(50)]
        + [torch.randn(32) for _ in range(20)]
        + [torch.randn(_SLICE * 2 + 17), torch.randn(_SMALL, dtype=torch.float64), torch.randn(300, 200).t()]
        + [with_nan, torch.randn(40, 40), torch.full((9,), -1.5), torch.zeros(0), torch.randn(5).half()]
    )
    fast, chunked = gradient_histograms(grads), _chunked(grads)
    exact = [0, 1, 2, 5] + list(range(6, 6 + BINS))
    assert torch.equal(fast[:, exact], chunked[:, exact])
    assert torch.allclose(fast[:, 3:5], chunked[:, 3:5], rtol=1e-4, atol=1e-3)


def test_a_watched_training_step_records_torch_histograms_of_its_gradients():
    # The whole path a training loop takes (the watch's gradient probe, the CPU histograms, the
    # step's table), on a transformer in float64: every bucket is torch.histogram's.
    from gradscope import watch, zoo

    torch.manual_seed(0)
    model = zoo.TransformerLM(vocab=64, d_model=32, n_layers=2, n_heads=2, max_len=16).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(64, (4, 16))
    records, grads = [], []
    with watch(model, optimizer, histograms_every=1, on_step=records.append):
        for _ in range(2):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), torch.roll(x, -1, 1).flatten())
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            optimizer.step()
    assert [len(r.histograms) for r in records] == [len(g) for g in grads] and len(grads[0]) > 10
    for record, step_grads in zip(records, grads):
        for name, g in step_grads.items():
            h, want = record.histograms[name], expected(g)
            assert (h.min, h.max, h.count, h.nonfinite) == (want["min"], want["max"], want["count"], 0), name
            assert list(h.buckets) == want["buckets"], name
