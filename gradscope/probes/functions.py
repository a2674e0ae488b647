"""Custom ``torch.autograd.Function``s a forward pass applies, and a finite-difference check of their backward.

Opt-in (``--gradcheck``): capturing wraps ``Function.apply`` for one forward
pass, and the check runs ``torch.autograd.gradcheck`` in float64 on a copy of
the inputs each Function first saw.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch.autograd.gradcheck import GradcheckError

from gradscope.probes.modules import ModuleTracker, describe_call
from gradscope.report import GradcheckResult

_APPLY = torch.autograd.Function.__dict__["apply"]  # the classmethod every Function inherits


@contextlib.contextmanager
def capturing(tracker: ModuleTracker | None) -> Iterator[dict[type, tuple[tuple[Any, ...], str | None]]]:
    """While entered, record each user-defined Function's first inputs (copied) and module."""
    seen: dict[type, tuple[tuple[Any, ...], str | None]] = {}

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if cls not in seen and not cls.__module__.startswith("torch"):
            where = tracker.current if tracker is not None else None
            module = describe_call(where[0] or "(model)", where[1], 1) if where else None
            seen[cls] = (tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args), module)
        return _APPLY.__func__(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)  # type: ignore[method-assign, assignment]
    try:
        yield seen
    finally:
        torch.autograd.Function.apply = _APPLY  # type: ignore[method-assign]


def check(cls: type, inputs: tuple[Any, ...], module: str | None) -> GradcheckResult:
    """``gradcheck`` (fast mode, float64) of ``cls``'s backward against finite differences."""
    args = tuple(
        a.detach().to(torch.float64).requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in inputs
    )
    name = cls.__qualname__
    try:
        torch.autograd.gradcheck(lambda *xs: cls.apply(*xs), args, fast_mode=True)  # type: ignore[attr-defined]
    except GradcheckError as exc:
        detail = " ".join(str(exc).split("\n\n")[0].split())
        return GradcheckResult(name, _source(cls), False, detail, module)
    except Exception as exc:  # the Function cannot run in float64, or is not differentiable that way
        return GradcheckResult(name, _source(cls), None, f"not checked: {type(exc).__name__}: {exc}", module)
    return GradcheckResult(name, _source(cls), True, None, module)


def _source(cls: type) -> str | None:
    backward = getattr(cls, "backward", None)
    try:
        return f"{inspect.getsourcefile(backward)}:{inspect.getsourcelines(backward)[1]}"  # type: ignore[arg-type]
    except (OSError, TypeError):
        return None
