"""Errors gradscope raises on purpose, and the exit code each one maps to.

Exit codes follow ruff/bandit: 0 clean, 1 findings at or above ``--fail-on``,
2 usage/config/model-build error, 3 internal error.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from gradscope.utils.frames import user_frame

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT


class GradscopeError(Exception):
    """Base class: a problem gradscope can explain to the user (exit code 2)."""

    exit_code = EXIT_USAGE

    def located(self, source: str | None, lines: dict[str, int]) -> GradscopeError:
        """The same error, told where in the config file its key is."""
        return self


class ConfigError(GradscopeError):
    """The config is invalid: names the key path and, where known, file:line.

    Args:
        problems: one ``(key_path, message)`` pair per problem found.
        source: the config file, if the config came from one.
        lines: line number (1-based) for each key path that the YAML gives.
    """

    def __init__(
        self,
        problems: list[tuple[str, str]],
        source: str | None = None,
        lines: dict[str, int] | None = None,
    ) -> None:
        self.problems = problems
        self.source = source
        self.lines = lines or {}
        super().__init__(self._render())

    def located(self, source: str | None, lines: dict[str, int]) -> ConfigError:
        if self.source:
            return self
        return ConfigError(self.problems, source, lines)

    def _render(self) -> str:
        rows = [f"{self._where(path)}{path + ': ' if path else ''}{msg}" for path, msg in self.problems]
        if len(rows) == 1:
            return f"invalid config: {rows[0]}"
        return "invalid config:\n" + "\n".join(f"  {row}" for row in rows)

    def _where(self, path: str) -> str:
        """``file:line: `` for a key path; a missing key points at its nearest parent."""
        while path and path not in self.lines:
            parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path)
            path = parent if parent != path else ""
        line = f":{self.lines[path]}" if path else ""
        return f"{self.source}{line}: " if self.source else ""


class GradientAnomaly(Exception):
    """Raised by ``gradscope.watch(..., raise_on=...)`` at the first step with a finding that severe.

    Attributes:
        anomaly: the finding (kind, place, step, message, evidence).
    """

    def __init__(self, anomaly: Any) -> None:
        self.anomaly = anomaly
        super().__init__(f"{anomaly.kind} at step {anomaly.step}: {anomaly.message}")


class ModelError(GradscopeError):
    """User code (model, data or loss factory, forward, backward) raised.

    The message names the config key whose code raised, the user's exception
    and the innermost frame of user code it came from.
    """

    def __init__(self, key: str, what: str, cause: BaseException, config_at: str = "") -> None:
        self.key, self.what, self.cause = key, what, cause
        where = user_frame(cause)
        at = f" (at {where})" if where else ""
        if isinstance(cause, SystemExit):
            told = f"called sys.exit({cause.code!r}), so no step could run to its end"
        else:
            told = f"raised {type(cause).__name__}: {cause}"
        super().__init__(f"{config_at}{key}: {what} {told}{at}")

    def located(self, source: str | None, lines: dict[str, int]) -> ModelError:
        line = lines.get(self.key) or lines.get(self.key.split(".")[0])
        config_at = f"{source}:{line}: " if source and line else ""
        located = ModelError(self.key, self.what, self.cause, config_at)
        located.__traceback__ = self.__traceback__
        return located


class RankFailure(GradscopeError):
    """Another rank stopped (it reports its own error) while this one waited for it in a collective."""

    def __init__(self, rank: int, exc: BaseException) -> None:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        super().__init__(
            f"rank {rank} stopped: another rank failed or stopped answering (see its own error); "
            f"the collective this rank waited in reported: {first[:300]}"
        )


# What gloo and NCCL say when a peer died, closed its connection or stopped answering.
_PEER_MARKS = ("closed by peer", "reset by peer", "pair closure", "timed out", "timeout", "gloo", "nccl", "c10d")


def peer_failed(exc: BaseException | None) -> bool:
    """The error (or one it was raised from) is a collective that lost its peers or timed out."""
    dist = sys.modules.get("torch.distributed")  # not imported: no collective ran, none failed
    while exc is not None:
        if dist is not None and isinstance(exc, dist.DistError):
            return True
        text = str(exc).lower()
        if any(mark in text for mark in _PEER_MARKS):
            return True
        exc = exc.__cause__
    return False
