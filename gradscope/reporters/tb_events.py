"""TensorBoard's event file, written directly: a step's scalars and histograms encoded as one
``Event`` in a few byte joins, each record framed with its masked CRC-32C.

Why not ``SummaryWriter``: it builds a protobuf object per value (a thousand-tensor model has two
thousand per step) and its writer checksums every event with a pure-Python CRC-32C (~75 ms for
600 KB), holding the interpreter lock the training thread needs. Here the wire format of
``tensorboard.Summary`` (summary.proto: ``Value.tag`` 1, ``simple_value`` 2, ``histo`` 5;
histogram.proto: ``min`` to ``sum_squares`` 1-5, packed ``bucket_limit`` 6 and ``bucket`` 7) is
written by hand, and the checksum is ``checksum.crc32c``: ``google-crc32c``'s C code when it is
installed (``pip install gradscope[fast]``), a numpy one otherwise (the bytes are the same). A run of empty buckets is written as one empty bucket, as TensorFlow's own
histogram summaries do (TensorBoard draws each bucket from the previous limit to its own).
"""

from __future__ import annotations

import functools
import math
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradscope.reporters.checksum import crc32c

_MASK_DELTA = 0xA282EAD8


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
    return _tag(tag) + b"\x15" + _float32(value)


def _float32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # beyond float32's range: infinite, as protobuf stores it
        return struct.pack("<f", math.copysign(math.inf, value))


# A HistogramProto's min, max, num, sum and sum_squares (fields 1-5, doubles), each after its key byte.
_HEAD = np.dtype([(f"{name}{part}", kind) for name in "abcde" for part, kind in (("_key", "u1"), ("", "<f8"))])


def equal_limits(rows: np.ndarray) -> np.ndarray:
    """(histograms, buckets): each bucket's upper edge when the buckets split ``min`` to ``max`` in
    equal steps (``rows`` as in ``histogram_values``), ``Histogram.limits``'s arithmetic for all at once."""
    n = rows.shape[1] - 6
    limits = rows[:, :1] + (rows[:, 1:2] - rows[:, :1]) * np.arange(1, n + 1, dtype=np.float64) / n
    limits[:, -1:] = rows[:, 1:2]  # the last edge is the maximum itself
    return limits


def histogram_values(tags: Sequence[str], rows: np.ndarray, limits: np.ndarray) -> list[bytes]:
    """``Summary.Value`` s holding one ``HistogramProto`` per row of ``rows``.

    Args:
        tags: the tag of each row.
        rows: (histograms, 6 + buckets) doubles: min, max, finite count, sum, sum of squares,
            non-finite count (not written), then the bucket counts.
        limits: (histograms, buckets): each bucket's upper edge.

    Each run of empty buckets is written as one that ends where the run ends. The fixed fields
    of every row are laid out as bytes in one array; each histogram then takes its slices.
    """
    count = rows.shape[0]
    head = np.empty(count, dtype=_HEAD)
    for column, name in enumerate("abcde"):
        head[f"{name}_key"] = (column + 1) << 3 | 1  # field number, wire type 1 (64-bit)
        head[name] = rows[:, column]
    counts = rows[:, 6:]
    keep = counts != 0  # a bucket is written where it holds values or ends a run of empty ones
    keep[:, :-1] |= counts[:, 1:] != 0
    keep[:, -1:] = True
    lengths = keep.sum(axis=1).tolist()
    heads = head.tobytes()
    limit_bytes, count_bytes = limits[keep].astype("<f8").tobytes(), counts[keep].astype("<f8").tobytes()
    out, at, size = [], 0, _HEAD.itemsize
    for i, (tag, k) in enumerate(zip(tags, lengths)):
        packed = _varint(8 * k)
        span = slice(8 * at, 8 * (at + k))
        histo = b"".join(
            (heads[size * i : size * (i + 1)], b"\x32", packed, limit_bytes[span], b"\x3a", packed, count_bytes[span])
        )
        out.append(_tag(tag) + b"\x2a" + _varint(len(histo)) + histo)
        at += k
    return out


@functools.lru_cache(maxsize=1 << 16)
def _tag(tag: str) -> bytes:
    """A ``Summary.Value``'s tag field (the same tags come back every step)."""
    return _delimited(b"\x0a", tag.encode())


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
