"""Auxiliary analyses that a model may not allow: skipped with a note instead of failing the run.

The fp32 underflow replay, the NaN replays, the backward error replay and
``--gradcheck`` look closer at a step the gradient statistics already
measured. A model that trains may still not let them run (an exotic tensor
subclass, an op with no fp32 kernel, a Function that is not differentiable
in float64): then the analysis is skipped for the run, ``run.notes`` says
which and why, and the statistics and every other finding come out as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from gradscope.errors import RankFailure


@contextlib.contextmanager
def optional(analysis: str, notes: list[str]) -> Iterator[None]:
    """Run the block; if it raises, add one note to ``notes`` (once per analysis) and carry on.

    A peer rank's failure is not swallowed: every rank must stop together. Interrupts pass too.

    Args:
        analysis: what the block does, as the note names it ("the fp32 underflow replay").
        notes: the run's notes (``Watch.notes``).
    """
    try:
        yield
    except RankFailure:
        raise
    except Exception as exc:  # whatever the model's code raised in the analysis, the run goes on
        note = f"{analysis} was skipped: {reason(exc)}"
        if not any(n.startswith(f"{analysis} was skipped") for n in notes):
            notes.append(note)


def reason(exc: BaseException) -> str:
    """``Type: first line of the message`` (messages of PyTorch errors run to many lines)."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__
