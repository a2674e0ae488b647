"""Which code is the user's: gradscope's and torch's own files are not (the built-in model files are).

Two questions cross the package: the innermost user frame of the running call (activation sites
and NaN origins name the line, on a hot path: plain string prefixes), and the innermost user frame
of a raised error's traceback (error messages; preferring a user's own file over an installed library).
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Any

PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)
TORCH_DIR = str(Path(importlib.util.find_spec("torch").origin).resolve().parent)  # found, not imported
# gradscope's own model files count as user code: they are what a config names.
MODEL_FILE_NAMES = ("zoo.py", "faults.py")
MODEL_FILES = tuple(str(Path(PACKAGE_DIR) / "runner" / name) for name in MODEL_FILE_NAMES)


def user_site() -> tuple[str, int, str] | None:
    """The innermost calling frame outside torch and gradscope (its model files count as user code).

    Returns:
        ``(filename, line, function)``, or None.
    """
    frame: Any = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        ours = filename.startswith(PACKAGE_DIR) and filename not in MODEL_FILES
        if not (ours or filename.startswith(TORCH_DIR) or filename.startswith("<")):
            return filename, frame.f_lineno, frame.f_code.co_name
        frame = frame.f_back
    return None


def user_frame(exc: BaseException) -> str | None:
    """Where user code raised, as ``file:line in func``."""
    frames = [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(exc.__traceback__)]
    return pick_user_frame(frames)


def pick_user_frame(frames: list[tuple[str, Any, str]]) -> str | None:
    """The innermost of ``(file, line, function)`` frames that is neither torch's nor gradscope's own
    (the zoo counts as user code), preferring code outside site-packages: a user's model file over
    the library it calls. As ``file:line in func``."""
    theirs = [f for f in frames if not _is_ours_or_torch(f[0])]
    outside = [f for f in theirs if not _is_installed(f[0])]
    picked = outside or theirs
    if not picked:
        return None
    filename, line, name = picked[-1]
    return f"{filename}:{line} in {name}"


def _is_ours_or_torch(filename: str) -> bool:
    if filename.startswith("<"):
        return True
    path = Path(filename).resolve()
    if path.is_relative_to(TORCH_DIR):
        return True
    return path.is_relative_to(PACKAGE_DIR) and path.name not in MODEL_FILE_NAMES


def _is_installed(filename: str) -> bool:
    parts = Path(filename).parts
    return "site-packages" in parts or "dist-packages" in parts
