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

__version__ = "0.1.0"

from gradscope.config import Settings, load_config  # noqa: E402
from gradscope.errors import ConfigError, GradientAnomaly, GradscopeError, ModelError  # noqa: E402
from gradscope.inspection import Inspection, inspect  # noqa: E402
from gradscope.report import Anomaly, Report  # noqa: E402
from gradscope.watch import Watch, watch  # noqa: E402

__all__ = [
    "Anomaly",
    "ConfigError",
    "GradientAnomaly",
    "GradscopeError",
    "Inspection",
    "ModelError",
    "Report",
    "Settings",
    "Watch",
    "__version__",
    "inspect",
    "load_config",
    "watch",
]
