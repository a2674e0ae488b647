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

import sys

from gradscope.config import Settings, load_config
from gradscope.errors import ConfigError, GradientAnomaly, GradscopeError, ModelError
from gradscope.observe.history import Retention
from gradscope.observe.watch import Watch, watch
from gradscope.report import Anomaly, Report
from gradscope.runner.inspection import Inspection, inspect
from gradscope.utils import moved
from gradscope.version import __version__

moved.install()  # old module paths (gradscope.watch, gradscope.zoo, ...) keep importing
moved.keep_functions(sys.modules[__name__])

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
