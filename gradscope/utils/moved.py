"""Old import paths of modules that moved into subpackages, served as the modules themselves.

``import gradscope.watch`` or ``gradscope.zoo:mlp`` in a config keeps working: a finder on
``sys.meta_path`` answers each old name with the module at its new place (the same object, so
``monkeypatch.setattr("gradscope.stats.total_norm", ...)`` patches the one the code uses).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

# old dotted path -> where the module lives now
MOVED: dict[str, str] = {
    "gradscope.frames": "gradscope.utils.frames",
    "gradscope.tensors": "gradscope.utils.tensors",
    "gradscope.outfiles": "gradscope.utils.outfiles",
    "gradscope.optional": "gradscope.utils.optional",
    "gradscope.piping": "gradscope.utils.piping",
    "gradscope.interrupts": "gradscope.utils.interrupts",
    "gradscope.yamlfile": "gradscope.utils.yamlfile",
    "gradscope.wrappers": "gradscope.utils.wrappers",
    "gradscope.report_json": "gradscope.report.report_json",
    "gradscope.report_check": "gradscope.report.report_check",
    "gradscope.tables": "gradscope.report.tables",
    "gradscope.stats": "gradscope.report.stats",
    "gradscope.checks": "gradscope.config.checks",
    "gradscope.config_base": "gradscope.config.config_base",
    "gradscope.step_judge": "gradscope.rules.step_judge",
    "gradscope.recording": "gradscope.probes.recording",
    "gradscope.replay": "gradscope.locate.replay",
    "gradscope.locating": "gradscope.locate.locating",
    "gradscope.capture": "gradscope.locate.capture",
    "gradscope.probes.forward_origin": "gradscope.locate.forward_origin",
    "gradscope.probes.origins": "gradscope.locate.origins",
    "gradscope.probes.inplace": "gradscope.locate.inplace",
    "gradscope.watch": "gradscope.observe.watch",
    "gradscope.history": "gradscope.observe.history",
    "gradscope.optimizer_hooks": "gradscope.observe.optimizer_hooks",
    "gradscope.distributed": "gradscope.observe.distributed",
    "gradscope.runs": "gradscope.observe.runs",
    "gradscope.inspection": "gradscope.runner.inspection",
    "gradscope.engine": "gradscope.runner.engine",
    "gradscope.loading": "gradscope.runner.loading",
    "gradscope.targets": "gradscope.runner.targets",
    "gradscope.checkpointing": "gradscope.runner.checkpointing",
    "gradscope.parallel": "gradscope.runner.parallel",
    "gradscope.zoo": "gradscope.runner.zoo",
    "gradscope.faults": "gradscope.runner.faults",
    "gradscope.help": "gradscope.cli.help",
}


class _Alias(importlib.abc.Loader):
    """Loads an old name as the module at its new place."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self.spec  # the import system set the alias's spec on the shared module


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds the old names in ``MOVED``; every other name is left to the usual finders."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        return None if new is None else importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())  # before any finder that knows another copy of the package


class _Package(ModuleType):
    """The ``gradscope`` package: an old module path imported never hides a function of the same name."""

    def __setattr__(self, name: str, value: object) -> None:
        # `from gradscope.watch import Watch` binds the module `gradscope.watch` on the package;
        # `gradscope.watch(model, ...)` is the function users call
        if isinstance(value, ModuleType) and name in _FUNCTIONS:
            return
        super().__setattr__(name, value)


_FUNCTIONS = ("watch",)


def keep_functions(package: ModuleType) -> None:
    """Keep ``gradscope.watch`` the function after ``import gradscope.watch``."""
    package.__class__ = _Package
