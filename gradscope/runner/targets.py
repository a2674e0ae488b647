"""Resolve and call ``target`` strings: ``path/to/file.py:attr`` or ``package.module:attr``.

As in Hydra's ``_target_``, a dict inside ``args`` that has a ``target`` key is
built first and passed in its place, so a Hugging Face model can be made from
its config object::

    model:
      target: transformers:GPT2LMHeadModel
      args:
        config: {target: transformers:GPT2Config, args: {n_layer: 2}}
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gradscope.errors import ConfigError, ModelError

FORMS = "expected `path/to/file.py:attr` or `package.module:attr`"


def resolve(target: str, base_dir: Path, key: str) -> Callable[..., Any]:
    """The callable a target string names.

    Args:
        target: ``file.py:attr`` (relative to ``base_dir``) or ``package.module:attr``;
            ``attr`` may be dotted (``Class.from_config``).
        base_dir: folder that relative file paths resolve against.
        key: the config key path, for error messages.

    Raises:
        ConfigError: the file or module cannot be found or imported, or lacks ``attr``.
    """
    where, _, attr = target.rpartition(":") if ":" in target else target.rpartition(".")
    if not where or not attr:
        raise ConfigError([(key, f"{FORMS}, got {target!r}")])
    module = _load_file(where, base_dir, key) if where.endswith(".py") else _import(where, key)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError([(key, f"{where} has no attribute {attr!r} (from target {target!r}){_close(obj, part)}")])
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError([(key, f"{target!r} is a {type(obj).__name__}, expected a class or function")])
    return obj


def _close(obj: Any, name: str) -> str:
    """``; did you mean 'LlamaForCausalLM'?``: the names of ``obj`` nearest a misspelled one, if any."""
    try:
        names = [n for n in dir(obj) if not n.startswith("_")]
    except Exception:  # a module whose __dir__ fails: no suggestion rather than a second error
        return ""
    near = difflib.get_close_matches(name, names, n=3, cutoff=0.75)
    if not near:
        lowered = {n.lower(): n for n in names}
        near = [lowered[m] for m in difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.75)]
    return f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""


def build(spec: Any, base_dir: Path, key: str, what: str) -> Any:
    """Resolve ``spec.target`` and call it with ``spec.args`` (nested targets built first).

    Raises:
        ConfigError: the target cannot be resolved or does not take these arguments.
        ModelError: the target itself raised.
    """
    fn = resolve(spec.target, base_dir, f"{key}.target")
    args = {name: _build_nested(value, base_dir, f"{key}.args.{name}") for name, value in spec.args.items()}
    return call(fn, args, key, what)


def call(fn: Callable[..., Any], kwargs: dict[str, Any], key: str, what: str, *args: Any) -> Any:
    """Call user code; whatever it raises becomes a ``ModelError`` naming ``key``."""
    try:
        with user_argv(fn):
            return fn(*args, **kwargs)
    except TypeError as exc:
        if _is_signature_error(exc, fn):
            raise ConfigError([(f"{key}.args", f"{_name(fn)} does not accept these arguments: {exc}")]) from None
        raise ModelError(key, what, exc) from exc
    except (Exception, SystemExit) as exc:  # sys.exit() and argparse's exit are the user's code leaving
        raise ModelError(key, what, exc) from exc


@contextlib.contextmanager
def user_argv(code: Any) -> Iterator[None]:
    """``sys.argv`` as a script of the user's own would see it (no gradscope options): argparse in
    user code then names the user's file, not gradscope, and parses no gradscope option."""
    saved = sys.argv
    name = getattr(getattr(code, "__code__", None), "co_filename", None) or str(code)
    sys.argv = [name]
    try:
        yield
    finally:
        sys.argv = saved


def _build_nested(value: Any, base_dir: Path, key: str) -> Any:
    if isinstance(value, dict) and "target" in value and set(value) <= {"target", "args"}:
        spec = _Spec(value["target"], value.get("args") or {})
        return build(spec, base_dir, key, f"nested target {spec.target!r}")
    if isinstance(value, dict):
        return {k: _build_nested(v, base_dir, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_build_nested(v, base_dir, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


class _Spec:
    def __init__(self, target: str, args: dict[str, Any]) -> None:
        self.target, self.args = target, args


def _is_signature_error(exc: TypeError, fn: Callable[..., Any]) -> bool:
    # A TypeError raised by the call itself (bad keyword) has no frame inside fn.
    tb = exc.__traceback__
    return tb is not None and tb.tb_next is None and "argument" in str(exc)


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _load_file(where: str, base_dir: Path, key: str) -> Any:
    path = (base_dir / where).resolve()
    if not path.is_file():
        raise ConfigError([(key, f"file not found: {path} ({FORMS}; relative paths start at the config's folder)")])
    name = f"gradscope_user.{path.stem}_{abs(hash(str(path))):x}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    # The file's folder goes on sys.path so the file can import its neighbours.
    sys.path.insert(0, str(path.parent))
    try:
        with user_argv(path):
            spec.loader.exec_module(module)  # type: ignore[union-attr]
    except (Exception, SystemExit) as exc:
        raise ModelError(key, f"importing {path}", exc) from exc
    finally:
        sys.path.remove(str(path.parent))
    sys.modules[name] = module
    return module


def _import(where: str, key: str) -> Any:
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name and where.startswith(exc.name):
            raise ConfigError([(key, f"no module named {exc.name!r} ({FORMS}; is the package installed?)")]) from None
        raise ModelError(key, f"importing {where}", exc) from exc
    except Exception as exc:
        raise ModelError(key, f"importing {where}", exc) from exc
