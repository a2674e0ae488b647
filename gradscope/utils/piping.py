"""Keeping stdout for a report written there (``--json -``, ``--csv -``): what the user's code prints
while gradscope runs it goes to stderr instead."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def user_stdout(piped: bool) -> Iterator[None]:
    """With a report on stdout, what the user's code prints goes to stderr, so stdout stays the report:
    Python's prints, and what C code writes to file descriptor 1 (a library's printf, a CUDA warning)."""
    if not piped:
        yield
        return
    sys.stdout.flush()
    saved = _redirect_fd(1, 2)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _flush_c_stdio()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _redirect_fd(fd: int, to: int) -> int | None:
    """Point ``fd`` at ``to``; a copy of the old ``fd`` to restore (None: no such descriptor here)."""
    try:
        saved = os.dup(fd)
        os.dup2(to, fd)
    except OSError:
        return None
    return saved


def _flush_c_stdio() -> None:
    """Flush C's stdio buffers, so that what C code printed reaches the descriptor it was printed to."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass  # no C library to load (a platform without dlopen(NULL))
