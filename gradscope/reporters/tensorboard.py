"""TensorBoard: one run per inspection, written step by step so an interrupted run stays readable.

Tags follow what Lightning and wandb users know: ``loss``, ``grad_norm/total``
(and ``grad_norm/total_clipped``), ``grad_norm/<param>``, ``gradients/<param>``
histograms (finite values; non-finite ones counted as ``nonfinite/<param>``),
``dead_fraction/<site>``, ``saturated_fraction/<site>``, ``clip/coefficient``,
``amp/loss_scale``, in distributed runs ``rank_loss/<rank>`` and ``rank_grad_norm/<rank>``
(DDP: before the all-reduce), the memory ledger's ``memory/<total>_bytes`` and
``memory/saved/<block>`` at the step it measured, each anomaly as text at its step, the config as text, and a
custom-scalars layout that groups layers by their top-level module.
"""

from __future__ import annotations

import atexit
import importlib.util
import io
import math
import queue
import re
import threading
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from gradscope.report import Histogram, Report, StepRecord
from gradscope.report.memory import MemoryReport
from gradscope.report.tables import HistogramTable
from gradscope.reporters.tb_events import EventFile, equal_limits, event, histogram_values, scalar_value, summary

# Steps waiting for the writer thread; a training loop that outruns it waits (nothing is dropped).
QUEUE_STEPS = 16
_DONE = object()


class TensorBoardReporter:
    """Writes scalars, histograms and text into one event file (``tb_events.EventFile``).

    Steps are handed to a background thread through a bounded queue: encoding the
    events and writing the file happen off the training thread. Each step
    is one event holding all its scalars and histograms; the file is flushed
    whenever the queue runs empty, and ``write``/``close`` (also at interpreter
    exit) wait until every queued step is written. An error of the writer thread
    is raised on the training thread at the next call.

    Args:
        logdir: the run's folder.
        config_text: the resolved config, logged as text.
    """

    def __init__(self, logdir: str, config_text: str | None = None) -> None:
        self.writer = EventFile(logdir)
        self.written: set[int] = set()
        if config_text:
            self.writer.add_summary(_text("config", "```\n" + config_text + "\n```"), 0)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_STEPS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="gradscope-tensorboard", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def on_step(self, step: StepRecord) -> None:
        """Queue one step as soon as it is measured (written by the background thread)."""
        self._raise_if_failed()
        if step.step in self.written:
            return
        self.written.add(step.step)
        self._queue.put(step)

    def write(self, report: Report) -> None:
        """The steps not written yet, the anomalies as text, and the layout."""
        for step in report.steps:
            self.on_step(step)
        self._queue.join()  # the steps first, then the text and pictures, from this thread
        self._raise_if_failed()
        for a in report.anomalies:
            where = " ".join(x for x in (a.module or "", a.parameter or "") if x)
            text = f"**{a.severity}** `{a.kind}` {where}: {a.message}"
            self.writer.add_summary(_text(f"anomalies/{a.kind}", text), a.step if a.step is not None else 0)
        if report.memory is not None:
            values = [scalar_value(tag, value) for tag, value in memory_scalars(report.memory)]
            self.writer.write(event(report.memory.step or 0, summary(values)))
        self.writer.add_summary(_custom_scalars(layout(report)), 0)
        self._picture(report)
        self.writer.flush()

    def _picture(self, report: Report) -> None:
        """The gradient-flow picture as an image, when matplotlib is installed: the PNG matplotlib
        writes, put in the event as it is (``add_figure`` would copy the pixels to float32 and encode
        them again, ~40 MiB at once for a model of a thousand tensors)."""
        if not report.steps or importlib.util.find_spec("matplotlib") is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        from gradscope.reporters.plot import figure, require_matplotlib

        drawn = figure(report)
        try:
            png = io.BytesIO()
            drawn.savefig(png, format="png")
            width, height = drawn.canvas.get_width_height()
        finally:
            require_matplotlib().close(drawn)
        image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png.getvalue())
        picture = Summary(value=[Summary.Value(tag="gradient_flow", image=image)])
        self.writer.add_summary(picture, report.steps[-1].step)

    def flush(self) -> None:
        """Wait until every queued step is written and the file flushed."""
        self._queue.join()
        self._raise_if_failed()
        self.writer.flush()

    def close(self) -> None:
        """Write every queued step, stop the thread and close the file (a second call does nothing)."""
        if self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()
        atexit.unregister(self.close)
        self.writer.close()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing the TensorBoard run in {self.writer.log_dir} failed: {error}") from error

    def _drain(self) -> None:
        """The writer thread: one event per step; a flush whenever no step is waiting."""
        while True:
            item = self._queue.get()
            try:
                if item is _DONE:
                    self.writer.flush()
                    return
                if self._error is None:
                    self.writer.write(event(item.step, step_summary(item)))
                    if self._queue.empty():
                        self.writer.flush()
            except Exception as error:  # kept for the training thread; the queue keeps draining
                self._error = error
            finally:
                self._queue.task_done()


def step_summary(step: StepRecord) -> bytes:
    """One step's scalars and histograms as a single serialized ``Summary``."""
    values = [scalar_value(tag, value) for tag, value in _scalars(step) if value is not None and math.isfinite(value)]
    for names, rows, limits in histogram_rows(step.histograms):
        values += [scalar_value(f"nonfinite/{names[i]}", rows[i, 5]) for i in np.flatnonzero(rows[:, 5])]
        drawn = np.flatnonzero(rows[:, 2])  # a gradient with no finite value has no histogram
        values += histogram_values([f"gradients/{names[i]}" for i in drawn], rows[drawn], limits[drawn])
    return summary(values)


def histogram_rows(histograms: Mapping[str, Histogram]) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
    """The histograms as groups of as many buckets each: names, rows and bucket limits (see
    ``tb_events.histogram_values``). A ``HistogramTable`` is one group, read where it lies."""
    if isinstance(histograms, HistogramTable):
        rows = np.frombuffer(histograms.values, dtype=np.float64).reshape(-1, histograms.width)
        return [(list(histograms.names), rows, equal_limits(rows))]
    groups: dict[int, list[tuple[str, Histogram]]] = defaultdict(list)
    for name, h in histograms.items():
        groups[len(h.buckets)].append((name, h))
    out = []
    for members in groups.values():
        hs = [h for _, h in members]
        rows = np.array([[h.min, h.max, h.count, h.sum, h.sum_squares, h.nonfinite, *h.buckets] for h in hs])
        out.append(
            ([n for n, _ in members], rows.astype(np.float64), np.array([h.limits() for h in hs], dtype=np.float64))
        )
    return out


def _text(tag: str, text: str) -> Any:
    from torch.utils.tensorboard.summary import text as text_summary  # heavy import, only when asked for

    return text_summary(tag, text)


def _custom_scalars(charts: dict[str, Any]) -> Any:
    from torch.utils.tensorboard.summary import custom_scalars

    return custom_scalars(charts)


def _scalars(step: StepRecord) -> list[tuple[str, float | None]]:
    out: list[tuple[str, float | None]] = [
        ("loss", step.loss),
        ("grad_norm/total", step.grad_norm_total),
        ("grad_norm/total_clipped", step.grad_norm_total_clipped),
        ("clip/coefficient", step.clip_coefficient),
        ("amp/loss_scale", step.loss_scale),
    ]
    for name, s in step.parameters.items():
        out.append((f"grad_norm/{name}", s.grad_norm))
        if s.nan_count or s.inf_count:
            out.append((f"nonfinite/{name}", float(s.nan_count + s.inf_count)))
    for site, a in step.activations.items():
        prefix = "dead_fraction" if a.kind == "relu" else "saturated_fraction"
        out.append((f"{prefix}/{site}", a.fraction))
    for rank in step.ranks:  # distributed runs: each rank's own view, to see one drift from the others
        out.append((f"rank_loss/{rank.rank}", rank.loss))
        out.append((f"rank_grad_norm/{rank.rank}", rank.grad_norm))
    for probe, values in step.probes.items():  # optional probes: <probe>/<key>
        out.extend((f"{probe}/{key}", value) for key, value in values.items())
    return out


def memory_scalars(memory: MemoryReport) -> list[tuple[str, float]]:
    """The memory ledger's totals in bytes (``memory/...``), and each candidate block's saved bytes
    (``memory/saved/<module>``, in forward order)."""
    out = [
        ("memory/saved_bytes", float(memory.saved_bytes)),
        ("memory/parameter_bytes", float(sum(memory.parameter_bytes.values()))),
        ("memory/gradient_bytes", float(sum(memory.gradient_bytes.values()))),
        ("memory/optimizer_bytes", float(sum((memory.optimizer_bytes or {}).values()))),
        ("memory/total_bytes", float(memory.total_bytes)),
    ]
    blocks = sorted((m.order, name, m.saved_bytes) for name, m in memory.modules.items() if m.candidate)
    out += [(f"memory/saved/{name}", float(saved)) for _, name, saved in blocks]
    return out


def layout(report: Report) -> dict[str, Any]:
    """Custom-scalars layout: the totals, then one chart per top-level module of its parameters' norms."""
    groups: dict[str, list[str]] = defaultdict(list)
    for p in report.parameters:
        if p.trainable:
            groups[_group(p.name)].append(p.name)
    charts = {
        group: ["Multiline", [f"grad_norm/{re.escape(group)}(\\.|$).*" if group != "(top)" else "grad_norm/[^.]*$"]]
        for group in groups
    }
    overview = {
        "loss": ["Multiline", ["loss"]],
        "total grad norm": ["Multiline", ["grad_norm/total", "grad_norm/total_clipped"]],
        "clipping and loss scale": ["Multiline", ["clip/coefficient", "amp/loss_scale"]],
        "dead / saturated": ["Multiline", ["dead_fraction/.*", "saturated_fraction/.*"]],
        "memory (bytes)": ["Multiline", ["memory/[a-z_]*_bytes"]],
    }
    return {"gradscope": overview, "grad norm by module": charts}


def _group(name: str) -> str:
    """``blocks.3.attn.qkv.weight`` -> ``blocks.3``; ``tok.weight`` -> ``tok``; ``scale`` -> ``(top)``."""
    parts = name.split(".")
    if len(parts) == 1:
        return "(top)"
    if len(parts) > 2 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]
