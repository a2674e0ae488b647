"""The hand-written event file: checked against tensorboard's own protobuf classes, its pure-Python
checksum and its loader (EventAccumulator)."""

import math
import random
import struct

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as tf_stub

import gradscope
from gradscope import zoo
from gradscope.probes.histograms import WIDTH, gradient_histograms
from gradscope.report import Histogram, StepRecord
from gradscope.reporters import checksum, tb_events
from gradscope.reporters.tb_events import EventFile, event, record, scalar_value, summary
from gradscope.reporters.tensorboard import step_summary
from gradscope.tables import HistogramTable

PAYLOADS = [b"", b"a", bytes(range(256)) * 3, b"\x00" * 1000]


@pytest.mark.parametrize("data", PAYLOADS)
def test_record_checksum_is_tensorboards_own(data):
    # The pure-Python CRC-32C is tensorboard's; the masking is checked against its masked_crc32c.
    assert tb_events.masked_crc32c(data, tf_stub.crc32c) == tf_stub.masked_crc32c(data)
    header = struct.pack("<Q", len(data))
    want = header + struct.pack("<I", tf_stub.masked_crc32c(header)) + data
    want += struct.pack("<I", tf_stub.masked_crc32c(data))
    assert record(data, tf_stub.crc32c) == want


@pytest.mark.parametrize("data", PAYLOADS)
def test_the_c_checksum_writes_the_same_bytes_as_the_pure_python_one(data):
    google_crc32c = pytest.importorskip("google_crc32c")
    assert google_crc32c.implementation == "c"
    assert record(data, google_crc32c.value) == record(data, tf_stub.crc32c)


def test_the_checksum_in_use_is_the_c_one_when_google_crc32c_is_installed():
    try:
        import google_crc32c
    except ImportError:
        google_crc32c = None
    c_code = google_crc32c is not None and google_crc32c.implementation == "c"
    assert checksum.CRC32C_SOURCE == ("google-crc32c" if c_code else "numpy blocks")


@pytest.mark.parametrize("length", [0, 1, 7, 511, 512, 513, 1024, 1537, 4096 + 3, 70001])
def test_the_numpy_checksum_is_tensorboards_crc32c(length):
    data = random.Random(length).randbytes(length)
    assert checksum.crc32c_numpy(data) == tf_stub.crc32c(data)
    assert record(data, checksum.crc32c_numpy) == record(data, tf_stub.crc32c)


def test_the_c_and_numpy_checksums_write_the_same_bytes_for_a_whole_step():
    # One step of a 1,004-tensor model's histograms (~600 KB of records), as both checksums frame it.
    google_crc32c = pytest.importorskip("google_crc32c")
    torch.manual_seed(0)
    grads = [torch.randn(32, 32) for _ in range(1004)]
    table = HistogramTable([f"p{i}" for i in range(len(grads))], gradient_histograms(grads).flatten().tolist(), WIDTH)
    body = event(3, step_summary(StepRecord(3, 1.0, 1.0, {}, {}, histograms=table)), wall_time=1.0)
    assert len(body) > 100_000
    for length in (len(body), len(body) - 1, 513, 511):
        data = body[:length]
        assert record(data, google_crc32c.value) == record(data, checksum.crc32c_numpy)


def collapsed(buckets: list[int], limits: list[float]) -> tuple[list[float], list[int]]:
    """TensorFlow's ``Histogram::EncodeToProto`` without zero buckets kept: runs of empty buckets as one."""
    out_limits, out_counts, i = [], [], 0
    while i < len(buckets):
        end, count = limits[i], buckets[i]
        i += 1
        if count == 0:
            while i < len(buckets) and buckets[i] == 0:
                end = limits[i]
                i += 1
        out_limits.append(end)
        out_counts.append(count)
    return out_limits, out_counts


HISTOGRAMS = [
    Histogram(-1.0, 1.0, 9, 0.5, 3.0, 0, (2, 0, 0, 0, 3, 0, 4)),
    Histogram(0.0, 3.0, 5, 4.0, 6.0, 1, (0, 0, 5)),
    Histogram(-2.5e-7, 7.1e-6, 100, 1e-5, 2e-10, 0, (40, 30, 20, 10)),
    Histogram(2.5, 2.5, 7, 17.5, 43.75, 0, (7, 0, 0, 0, 0)),
    Histogram(0.0, 1.0, 1, 1.0, 1.0, 0, (0,) * 200 + (1,)),  # lengths past one varint byte
]


def histogram_summary(histograms) -> Summary:
    """The histogram values (and non-finite counts) of a step's summary, without its totals."""
    parsed = Summary.FromString(step_summary(StepRecord(0, None, 1.0, {}, {}, histograms=histograms)))
    return Summary(value=[v for v in parsed.value if v.tag != "grad_norm/total"])


def test_histograms_parse_as_tensorboards_histogram_proto_with_empty_runs_merged():
    tags = [f"w{i}" for i in range(len(HISTOGRAMS))]
    parsed = {v.tag: v for v in histogram_summary(dict(zip(tags, HISTOGRAMS))).value}
    assert parsed.pop("nonfinite/w1").simple_value == 1.0
    assert sorted(parsed) == sorted(f"gradients/{t}" for t in tags)
    for tag, h in zip(tags, HISTOGRAMS):
        limits, counts = collapsed(list(h.buckets), h.limits())
        want = HistogramProto(
            min=h.min, max=h.max, num=h.count, sum=h.sum, sum_squares=h.sum_squares, bucket_limit=limits, bucket=counts
        )
        assert parsed[f"gradients/{tag}"].histo == want
    assert list(parsed["gradients/w0"].histo.bucket) == [2, 0, 3, 0, 4]


def test_a_measured_table_writes_the_same_bytes_as_its_histograms():
    torch.manual_seed(0)
    grads = [torch.randn(16, 8), torch.randn(1000) ** 3, torch.tensor([1.0, math.nan, 2.0]), torch.full((4,), math.nan)]
    names = [f"p{i}" for i in range(len(grads))]
    table = HistogramTable(names, gradient_histograms(grads).flatten().tolist(), WIDTH)
    assert table == {n: table[n] for n in names} and table["p2"].nonfinite == 1
    plain = {n: table[n] for n in names}
    record = StepRecord(0, None, 1.0, {}, {}, histograms=table)
    assert step_summary(record) == step_summary(StepRecord(0, None, 1.0, {}, {}, histograms=plain))
    tags = [v.tag for v in histogram_summary(table).value]
    assert tags == ["nonfinite/p2", "nonfinite/p3", "gradients/p0", "gradients/p1", "gradients/p2"]


def test_scalars_parse_as_float32_simple_values():
    parsed = Summary.FromString(
        summary([scalar_value("loss", 0.1), scalar_value("big", 1e39), scalar_value("é", -2.0)])
    )
    assert [(v.tag, v.simple_value) for v in parsed.value] == [
        ("loss", struct.unpack("<f", struct.pack("<f", 0.1))[0]),
        ("big", math.inf),
        ("é", -2.0),
    ]


def test_an_event_parses_with_its_step_and_wall_time():
    body = summary([scalar_value("loss", 1.5)])
    for step in (0, 7, 300, 2**40):
        parsed = Event.FromString(event(step, body, wall_time=1234.5))
        assert (parsed.step, parsed.wall_time, parsed.summary.value[0].simple_value) == (step, 1234.5, 1.5)


def test_an_event_file_reads_back_in_tensorboards_loader(tmp_path):
    events = EventFile(str(tmp_path))
    values = list(histogram_summary({"w": HISTOGRAMS[0]}).value) + [scalar_value("loss", 2.0)]
    encoded = [v.SerializeToString() if isinstance(v, Summary.Value) else v for v in values]
    for step in range(3):
        events.write(event(step, summary(encoded)))
    events.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [0, 1, 2]
    (first, *_) = acc.Histograms("gradients/w")
    assert (first.histogram_value.min, first.histogram_value.num, first.histogram_value.bucket) == (
        -1.0,
        9,
        [2, 0, 3, 0, 4],
    )


def test_a_watched_run_has_every_tag_of_every_step(tmp_path):
    torch.manual_seed(0)
    model = zoo.MLP(in_features=8, hidden=16, depth=4, classes=3, residual=True, norm=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 8), torch.randint(3, (32,))
    with gradscope.watch(model, optimizer, logdir=str(tmp_path), histograms_every=1) as scope:
        for _ in range(4):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    for name, param in model.named_parameters():
        assert [e.step for e in acc.Scalars(f"grad_norm/{name}")] == [0, 1, 2, 3]
        histograms = acc.Histograms(f"gradients/{name}")
        assert [h.step for h in histograms] == [0, 1, 2, 3]
        assert all(h.histogram_value.num == param.numel() for h in histograms)
    last = scope.steps[-1] if scope.steps[-1].step == 3 else None
    if last is not None:  # the kept last step: its table is what the file holds
        h = last.histograms["out.weight"]
        written = acc.Histograms("gradients/out.weight")[-1].histogram_value
        assert (written.min, written.max, sum(written.bucket)) == (h.min, h.max, h.count)


def test_every_tag_of_a_watched_transformer_run_reads_back_at_every_step(tmp_path):
    # Each step's summary, as the watch hands it to the writer, against what the loader finds:
    # scalars (loss, totals, per-parameter norms, activation fractions) and histograms alike.
    torch.manual_seed(0)
    model = zoo.TransformerLM(vocab=64, d_model=32, n_layers=2, n_heads=2, max_len=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(64, (4, 16))
    tags: dict[str, list[int]] = {}

    def seen(step: StepRecord) -> None:
        for value in Summary.FromString(step_summary(step)).value:
            tags.setdefault(value.tag, []).append(step.step)

    with gradscope.watch(model, optimizer, logdir=str(tmp_path), histograms_every=2, on_step=seen):
        for _ in range(4):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), torch.roll(x, -1, 1).flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    found = acc.Tags()
    histograms = {t for t in tags if t.startswith("gradients/")}
    assert len(histograms) == sum(1 for _ in model.parameters())
    assert {"loss", "grad_norm/total", "clip/coefficient"} <= set(tags)
    assert set(found["histograms"]) == histograms
    assert set(found["scalars"]) == set(tags) - histograms
    for tag, steps in tags.items():
        events = acc.Histograms(tag) if tag in histograms else acc.Scalars(tag)
        assert [e.step for e in events] == steps, tag
    assert tags["gradients/tok.weight"] == [0, 2] and tags["loss"] == [0, 1, 2, 3]
