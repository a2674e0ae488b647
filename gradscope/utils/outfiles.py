"""Files a run writes (``--json``, ``--junit``, ``--plot``, ``--logdir``, ``--update-baseline``):
checked before the run starts, written at the end one by one.

``-`` is stdout wherever a file is taken; a symlink is written through (its target changes, the
link stays); the config file is never an output; a regular file is replaced atomically (a
temporary file beside it), a device or pipe is written in place. ``/dev/stdout``, ``/dev/stderr``
and ``/dev/fd/N`` name the process's own open descriptors: they are written through the
descriptor, never opened by path (an ordinary user may not open a pipe or file another user
made, though the descriptor it inherited writes to it) and never replaced (a shell's ``> file``
keeps its file).
"""

from __future__ import annotations

import os
import re
import stat
import sys
import tempfile
from pathlib import Path

from gradscope.errors import GradscopeError

STDOUT = "-"
_DESCRIPTOR = re.compile(r"^/(?:dev/(?:fd/(\d+)|(stdout|stderr))|proc/self/fd/(\d+))$")
_STREAMS = {"stdout": 1, "stderr": 2}


def descriptor(path: str) -> int | None:
    """The file descriptor a path names (``/dev/stdout``: 1, ``/dev/fd/3``: 3), or None."""
    match = _DESCRIPTOR.match(os.path.normpath(path)) if path else None
    if match is None:
        return None
    fd, stream, proc = match.groups()
    return _STREAMS[stream] if stream else int(fd or proc)


def is_stdout(path: str | None) -> bool:
    """``-`` or a name of the standard output (``/dev/stdout``, ``/dev/fd/1``)."""
    return path == STDOUT or (path is not None and descriptor(path) == 1)


class OutputError(GradscopeError):
    """An output cannot be written: names the option, the path and why."""

    def __init__(self, option: str, path: str, reason: str) -> None:
        self.option, self.path = option, path
        super().__init__(f"{option}: cannot write {path or repr(path)}: {reason}")


def check_file(option: str, path: str, protected: list[Path] = ()) -> None:  # type: ignore[assignment]
    """Refuse, before the run, a file that could not be written at its end.

    Args:
        option: the option that names it (for the message).
        path: the file, or ``-`` for stdout.
        protected: files that must never be overwritten (the config).

    Raises:
        OutputError: empty, a folder, the config itself, or not writable.
    """
    if path == STDOUT:
        return
    if not path:
        raise OutputError(option, path, "the path is empty (give a file, or - for stdout)")
    fd = descriptor(path)
    if fd is not None:
        try:
            os.fstat(fd)
        except OSError:
            raise OutputError(option, path, f"file descriptor {fd} is not open in this process") from None
        return
    real = target(path)
    if any(real == p.resolve() for p in protected):
        raise OutputError(option, path, "that is the config file; choose another name")
    if real.is_dir():
        raise OutputError(option, path, "it is a folder; give a file name")
    if real.exists():
        _probe_open(option, path, real)
    else:
        _probe_folder(option, path, real.parent)


def check_files(named: dict[str, str | None], protected: list[Path] = ()) -> None:  # type: ignore[assignment]
    """``check_file`` for each option -> path given (None: not asked for), and no two the same."""
    for option, path in named.items():
        if path is not None:
            check_file(option, path, protected)
    check_distinct(named)


def check_folder(option: str, path: str) -> None:
    """Refuse, before the run, a folder that could not be made or written into.

    Raises:
        OutputError: empty, ``-``, a file, or not writable.
    """
    if not path or path == STDOUT:
        raise OutputError(option, path, "expected a folder")
    real = target(path)
    if real.exists() and not real.is_dir():
        raise OutputError(option, path, "it is a file, not a folder")
    _probe_folder(option, path, real)


def check_distinct(named: dict[str, str | None]) -> None:
    """Two outputs on one file (or both on stdout) would overwrite each other.

    Raises:
        OutputError: the second option that names a path already taken.
    """
    seen: dict[str, str] = {}
    for option, path in named.items():
        if not path:
            continue
        fd = descriptor(path)
        key = STDOUT if is_stdout(path) else (f"descriptor {fd}" if fd is not None else str(target(path)))
        if key in seen:
            raise OutputError(option, path, f"{seen[key]} writes there too")
        seen[key] = option


def write_text(option: str, path: str, text: str) -> None:
    """Write ``text`` to ``path`` (``-``: stdout) through any symlink.

    Raises:
        OutputError: the write failed (the message says why).
    """
    if is_stdout(path):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    write_bytes(option, path, text.encode("utf-8"))


def write_bytes(option: str, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (``-``: stdout's bytes) through any symlink, atomically for a file.

    Raises:
        OutputError: the write failed.
    """
    if is_stdout(path):
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    fd = descriptor(path)
    if fd is not None:
        _write_descriptor(option, path, fd, data)
        return
    real = target(path)
    try:
        if real.exists() and not stat.S_ISREG(real.stat().st_mode):
            with open(real, "wb") as f:  # a device or pipe: there is no file to replace
                f.write(data)
            return
        real.parent.mkdir(parents=True, exist_ok=True)
        _replace(real, data)
    except OSError as exc:
        raise OutputError(option, path, exc.strerror or str(exc)) from None


def _write_descriptor(option: str, path: str, fd: int, data: bytes) -> None:
    """Write through an open descriptor, in place, as a shell's redirection expects."""
    sys.stderr.flush()  # text already printed to stderr comes first
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        raise OutputError(option, path, exc.strerror or str(exc)) from None


def target(path: str) -> Path:
    """The file a path writes: a symlink's target; a device or pipe (``/dev/stdout``) as named."""
    named = Path(path)
    if named.exists() and not named.is_file() and not named.is_dir():
        return named
    return named.resolve()


def _replace(real: Path, data: bytes) -> None:
    """Write beside the file and rename over it: a reader never sees half a report."""
    mode = real.stat().st_mode & 0o777 if real.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, real)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _probe_open(option: str, path: str, real: Path) -> None:
    try:
        with open(real, "ab"):  # opens for writing without changing a byte
            pass
    except OSError as exc:
        raise OutputError(option, path, exc.strerror or str(exc)) from None
    if stat.S_ISREG(real.stat().st_mode):
        _probe_folder(option, path, real.parent)  # the atomic replace needs the folder too


def _probe_folder(option: str, path: str, folder: Path) -> None:
    """The nearest existing folder on the way to ``folder`` must take a new file."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(option, path, f"{existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".gradscope-probe-")
    except OSError as exc:
        raise OutputError(option, path, f"cannot create a file in {existing}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
