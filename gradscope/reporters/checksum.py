"""CRC-32C (Castagnoli), the checksum of every TFRecord in a TensorBoard event file.

``google-crc32c``'s C code when it is installed (``pip install gradscope[fast]``); otherwise
``crc32c_numpy``, which runs the table-driven CRC over many blocks of the data at once: byte ``t``
of every block in one numpy step, so the Python loop is as long as a block, not as the data. The
CRC register after a block is a linear function of the register before it (running ``m`` zero
bytes, ``A^m``) plus the block's own CRC from zero, so the blocks' CRCs are folded in order with
``A^m`` read from four byte tables. tensorboard's byte-at-a-time pure-Python CRC (~75 ms for
600 KB, holding the interpreter lock the training thread needs) is the reference the tests
compare both with.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

_POLY = 0x82F63B78  # reflected Castagnoli polynomial
_BLOCK = 512  # bytes per block: the numpy loop runs this many steps, the fold one per block


def _byte_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (_POLY if c & 1 else 0)
        table.append(c)
    return table


_TABLE = _byte_table()
_TABLE_NP = np.array(_TABLE, dtype=np.uint32)


def _run(crc: int, data: bytes | memoryview) -> int:
    """The CRC register after ``data``, from register ``crc`` (byte by byte)."""
    table = _TABLE
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


@functools.lru_cache(maxsize=4)
def _advance_tables(length: int) -> tuple[list[int], ...]:
    """Four byte tables of the linear map "run ``length`` zero bytes": the register's byte ``j``
    with value ``b`` contributes ``tables[j][b]``."""
    columns = [_run(1 << bit, bytes(length)) for bit in range(32)]  # the map's image of each bit
    tables = []
    for j in range(4):
        table = [0] * 256
        for b in range(1, 256):
            low = b & -b  # the lowest set bit of b, and b without it
            table[b] = table[b ^ low] ^ columns[8 * j + low.bit_length() - 1]
        tables.append(table)
    return tuple(tables)


def crc32c_numpy(data: bytes) -> int:
    """CRC-32C of ``data``, in numpy steps over blocks of ``_BLOCK`` bytes (see the module)."""
    blocks = len(data) // _BLOCK
    crc = 0xFFFFFFFF
    if blocks > 1:
        # (block byte, block): row t holds byte t of every block, contiguous for each numpy step.
        columns = np.frombuffer(data, dtype=np.uint8, count=blocks * _BLOCK).reshape(blocks, _BLOCK).T.copy()
        own = np.zeros(blocks, dtype=np.uint32)  # each block's CRC register from zero
        for row in columns:
            own = _TABLE_NP[(own ^ row) & 0xFF] ^ (own >> 8)
        t0, t1, t2, t3 = _advance_tables(_BLOCK)
        for r in own.tolist():
            crc = t0[crc & 0xFF] ^ t1[(crc >> 8) & 0xFF] ^ t2[(crc >> 16) & 0xFF] ^ t3[crc >> 24] ^ r
        data = memoryview(data)[blocks * _BLOCK :]
    return _run(crc, data) ^ 0xFFFFFFFF


def _fastest() -> tuple[Callable[[bytes], int], str]:
    try:
        import google_crc32c
    except ImportError:
        google_crc32c = None
    if google_crc32c is not None and google_crc32c.implementation == "c":
        return google_crc32c.value, "google-crc32c"
    return crc32c_numpy, "numpy blocks"


crc32c, CRC32C_SOURCE = _fastest()
