"""TensorBoard's event file, written directly: a step's scalars and histograms encoded as one
``Event`` in a few byte joins, each record framed with its masked CRC-32C.

Why not ``SummaryWriter``: it builds a protobuf object per value (a thousand-tensor model has two
thousand per step) and its writer checksums every event with a pure-Python CRC-32C (~75 ms for
600 KB), holding the interpreter lock the training thread needs. Here the wire format of
``tensorboard.Summary`` (summary.proto: ``Value.tag`` 1, ``simple_value`` 2, ``histo`` 5;
histogram.proto: ``min`` to ``sum_squares`` 1-5, packed ``bucket_limit`` 6 and ``bucket`` 7) is
written by hand, and the checksum is ``google-crc32c``'s C code when it is installed
(``pip install gradscope[fast]``), tensorboard's own pure-Python one otherwise: the bytes are the
same either way. A run of empty buckets is written as one empty bucket, as TensorFlow's own
histogram summaries do (TensorBoard draws each bucket from the previous limit to its own).
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from gradscope.report import Histogram

_MASK_DELTA = 0xA282EAD8


def _crc32c_function() -> tuple[Callable[[bytes], int], str]:
    """The fastest CRC-32C at hand, and its name."""
    try:
        import google_crc32c
    except ImportError:
        google_crc32c = None
    if google_crc32c is not None and google_crc32c.implementation == "c":
        return google_crc32c.value, "google-crc32c"
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c

    return crc32c, "tensorboard (pure Python)"


crc32c, CRC32C_SOURCE = _crc32c_function()


def masked_crc32c(data: bytes, crc: Callable[[bytes], int] | None = None) -> int:
    """The TFRecord checksum of ``data``: its CRC-32C rotated right by 15 bits plus a constant."""
    x = (crc or crc32c)(data) & 0xFFFFFFFF
    return (((x >> 15) | (x << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def record(data: bytes, crc: Callable[[bytes], int] | None = None) -> bytes:
    """One TFRecord: length, its masked CRC, the data, the data's masked CRC (little-endian)."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header, crc)) + data + struct.pack("<I", masked_crc32c(data, crc))


def _varint(n: int) -> bytes:
    if n < len(_SHORT):
        return _SHORT[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SHORT = [bytes((n,)) if n < 0x80 else bytes(((n & 0x7F) | 0x80, n >> 7)) for n in range(1 << 14)]  # 1-2 bytes


def _delimited(key: bytes, payload: bytes) -> bytes:
    return key + _varint(len(payload)) + payload


def scalar_value(tag: str, value: float) -> bytes:
    """A ``Summary.Value`` with ``simple_value`` (a float32, as TensorBoard keeps it)."""
    return _delimited(b"\x0a", tag.encode()) + b"\x15" + _float32(value)


def _float32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # beyond float32's range: infinite, as protobuf stores it
        return struct.pack("<f", math.copysign(math.inf, value))


def histogram_values(tags: list[str], histograms: list[Histogram]) -> list[bytes]:
    """``Summary.Value`` s holding each histogram as a ``HistogramProto``, each run of empty buckets
    written as one that ends where the run ends."""
    out: list[bytes] = [b""] * len(histograms)
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, h in enumerate(histograms):
        by_size[len(h.buckets)].append(i)
    for members in by_size.values():
        encoded = _same_size([tags[i] for i in members], [histograms[i] for i in members])
        for i, value in zip(members, encoded):
            out[i] = value
    return out


def _same_size(tags: list[str], histograms: list[Histogram]) -> list[bytes]:
    """``histogram_values`` of histograms with as many buckets each. The limits are
    ``Histogram.limits``'s arithmetic done for all at once on (histograms, buckets) arrays; each
    histogram then takes its slice of the bytes."""
    counts = np.array([h.buckets for h in histograms], dtype="<f8").reshape(len(histograms), -1)
    low = np.array([h.min for h in histograms], dtype="<f8")[:, None]
    high = np.array([h.max for h in histograms], dtype="<f8")[:, None]
    n = counts.shape[1]
    limits = low + (high - low) * np.arange(1, n + 1, dtype="<f8") / n
    # A bucket is written where it holds values or ends a run of empty ones.
    keep = counts != 0
    keep[:, :-1] |= counts[:, 1:] != 0
    keep[:, -1:] = True
    lengths = keep.sum(axis=1).tolist()
    limit_bytes, count_bytes = limits[keep].tobytes(), counts[keep].tobytes()
    out, at = [], 0
    for tag, h, k in zip(tags, histograms, lengths):
        head = struct.pack(
            "<BdBdBdBdBd", 0x09, h.min, 0x11, h.max, 0x19, float(h.count), 0x21, h.sum, 0x29, h.sum_squares
        )
        size = _varint(8 * k)
        span = slice(8 * at, 8 * (at + k))
        histo = b"".join((head, b"\x32", size, limit_bytes[span], b"\x3a", size, count_bytes[span]))
        out.append(_delimited(b"\x0a", tag.encode()) + _delimited(b"\x2a", histo))
        at += k
    return out


def summary(values: Iterable[bytes]) -> bytes:
    """A ``Summary`` of encoded values."""
    return b"".join(_delimited(b"\x0a", v) for v in values)


def event(step: int, body: bytes, wall_time: float | None = None) -> bytes:
    """An ``Event`` at ``step`` holding the encoded ``Summary`` ``body``."""
    wall = time.time() if wall_time is None else wall_time
    return b"\x09" + struct.pack("<d", wall) + b"\x10" + _varint(step & 0xFFFFFFFFFFFFFFFF) + _delimited(b"\x2a", body)


class EventFile:
    """One ``events.out.tfevents.*`` file in ``logdir``, named as TensorBoard's writers name theirs.

    Args:
        logdir: the run's folder (made if missing).
    """

    def __init__(self, logdir: str) -> None:
        Path(logdir).mkdir(parents=True, exist_ok=True)
        self.log_dir = logdir
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}.{id(self)}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "wb")  # open for the run: closed by close()
        version = b"\x09" + struct.pack("<d", time.time()) + _delimited(b"\x1a", b"brain.Event:2")
        self.write(version)
        self.flush()

    def write(self, serialized_event: bytes) -> None:
        """Append one serialized ``Event``."""
        self._file.write(record(serialized_event))

    def add_summary(self, summary_proto: Any, step: int) -> None:
        """Append a ``Summary`` protobuf (text, layouts, images: the rare values) at ``step``."""
        self.write(event(step, summary_proto.SerializeToString()))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
