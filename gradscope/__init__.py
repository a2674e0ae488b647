"""gradscope: gradient diagnostics for PyTorch.

Run it on a YAML config (``gradscope inspect config.yaml``), from Python::

    import gradscope
    report = gradscope.inspect("configs/residual_mlp.yaml")
    for step in report.steps:
        print(step.step, step.loss, step.grad_norm_total)

or inside your own training loop::

    with gradscope.watch(model, optimizer=opt, logdir="runs/exp1") as scope:
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    print(scope.report.anomalies)
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from gradscope.errors import ConfigError, GradientAnomaly, GradscopeError, ModelError
from gradscope.utils import moved
from gradscope.version import __version__

moved.install()  # old module paths (gradscope.watch, gradscope.zoo, ...) keep importing
moved.keep_functions(sys.modules[__name__])

# Loaded on first use (PEP 562), so `gradscope --help`, `gradscope show` and a config error import no torch.
_LAZY = {
    "Anomaly": "gradscope.report",
    "Report": "gradscope.report",
    "Settings": "gradscope.config",
    "load_config": "gradscope.config",
    "Retention": "gradscope.observe.history",
    "Watch": "gradscope.api",
    "watch": "gradscope.api",
    "Inspection": "gradscope.api",
    "inspect": "gradscope.api",
}

# what `import gradscope` once imported with it, reached as attributes (`gradscope.report.Report`)
_SUBPACKAGES = ("api", "config", "locate", "observe", "probes", "report", "reporters", "rules", "runner", "utils")

if TYPE_CHECKING:
    from gradscope.api import Inspection, Watch, inspect, watch
    from gradscope.config import Settings, load_config
    from gradscope.observe.history import Retention
    from gradscope.report import Anomaly, Report


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is not None:
        value = getattr(importlib.import_module(where), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES or f"gradscope.{name}" in moved.MOVED:  # `gradscope.report.Report`, `gradscope.zoo.mlp`
        return importlib.import_module(f"gradscope.{name}")
    raise AttributeError(f"module 'gradscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Anomaly",
    "ConfigError",
    "GradientAnomaly",
    "GradscopeError",
    "Inspection",
    "ModelError",
    "Report",
    "Retention",
    "Settings",
    "Watch",
    "__version__",
    "inspect",
    "load_config",
    "watch",
]
