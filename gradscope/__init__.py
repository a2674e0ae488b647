"""gradscope: gradient diagnostics for PyTorch.

Run it on a YAML config (``gradscope inspect config.yaml``) or from Python::

    import gradscope
    report = gradscope.inspect("configs/deep_sigmoid_mlp.yaml")
    for step in report.steps:
        print(step.step, step.loss, step.grad_norm_total)
"""

__version__ = "0.1.0"

from gradscope.config import Settings, load_config  # noqa: E402
from gradscope.errors import ConfigError, GradscopeError, ModelError  # noqa: E402
from gradscope.inspection import Inspection, inspect  # noqa: E402
from gradscope.report import Anomaly, Report  # noqa: E402

__all__ = [
    "Anomaly",
    "ConfigError",
    "GradscopeError",
    "Inspection",
    "ModelError",
    "Report",
    "Settings",
    "__version__",
    "inspect",
    "load_config",
]
