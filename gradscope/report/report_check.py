"""Read JSON into the report's dataclasses, checked against their type hints on the way.

One walk both checks and builds: every field of every dataclass is read by its own type hint, so
a field added to a dataclass is read back (and checked) with no change here, and a truncated,
hand-edited or foreign file is refused with the path of its first bad field.

The JSON form is the dataclasses' with two differences: non-finite floats are the strings
``"nan"``, ``"inf"`` and ``"-inf"``, and a field whose metadata names ``KEYED_BY`` (the report's
``parameters``) is an object from that field of each element to the element's other fields.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from gradscope.report import KEYED_BY, Report

NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# Inside free-form values (``Any``), keys whose value is text even when it reads "nan" or "inf".
_TEXT = frozenset({"kind"})


class ReportError(ValueError):
    """A field of a report's JSON does not match the schema: ``path`` names it."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path or 'the report'}: {message}")


def check_report(data: Any) -> None:
    """Raise ``ReportError`` at the first field of ``data`` that ``Report.from_dict`` could not read."""
    read_report(data)


def read_report(data: Any) -> Report:
    """``data``, the JSON form of a report, as a ``Report``.

    Raises:
        ReportError: naming the path of the first field that is missing, unknown or of the wrong type.
    """
    return read(Report, data, required=("anomalies",))


def read(cls: type, data: Any, path: str = "", required: tuple[str, ...] = ()) -> Any:
    """``data`` read as the dataclass ``cls`` (``required``: fields that must be present even with a default).

    Raises:
        ReportError: naming the path of the first field that does not match its type hint.
    """
    if isinstance(data, dict):
        for name in required:
            _expect(name in data, _join(path, name), "missing", None)
    return _dataclass(cls, data, path)


def _value(hint: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return _free(value)
    if origin in (Union, types.UnionType):
        return _union(hint, args, value, path)
    if origin is Literal:
        _expect(value in args, path, f"expected one of {list(args)}", value)
        return value
    if dataclasses.is_dataclass(hint):
        return _dataclass(hint, value, path)
    if origin in (tuple, list):
        _expect(isinstance(value, list), path, "expected a list", value)
        return _sequence(origin, args, value, path)
    if origin in (dict, Mapping):
        _expect(isinstance(value, dict), path, "expected an object", value)
        return {key: _value(args[1] if args else Any, item, f"{path}.{key}") for key, item in value.items()}
    return _scalar(hint, value, path)


def _union(hint: Any, args: tuple[Any, ...], value: Any, path: str) -> Any:
    options = [arg for arg in args if arg is not type(None)]
    if value is None and len(options) < len(args):
        return None
    if len(options) == 1:  # X | None: X's own error names the field inside that is wrong
        return _value(options[0], value, path)
    for arg in options:
        try:
            return _value(arg, value, path)
        except ReportError:
            continue
    raise ReportError(path, f"expected {_name(hint)}, got {_show(value)}")


def _sequence(origin: Any, args: tuple[Any, ...], value: list[Any], path: str) -> Any:
    if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length: tuple[int, float, float]
        _expect(len(value) == len(args), path, f"expected a list of {len(args)}", value)
        return tuple(_value(arg, item, f"{path}[{i}]") for i, (arg, item) in enumerate(zip(args, value)))
    element = args[0] if args else Any
    items = [_value(element, item, f"{path}[{i}]") for i, item in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is float:
        if isinstance(value, str) and value in NONFINITE:
            return NONFINITE[value]
        _expect(isinstance(value, (int, float)) and not isinstance(value, bool), path, "expected a number", value)
        return float(value)
    if hint is int:
        _expect(isinstance(value, int) and not isinstance(value, bool), path, "expected an integer", value)
        return value
    if hint in (str, bool):
        _expect(isinstance(value, hint), path, f"expected {'text' if hint is str else 'true or false'}", value)
        return value
    raise TypeError(f"{path}: no JSON form for the type {hint!r}")  # a report field of a type not read here


def _dataclass(cls: Any, value: Any, path: str, key: tuple[str, str] | None = None) -> Any:
    """``value`` as ``cls``; ``key``: (field, value) the JSON form holds outside the object."""
    _expect(isinstance(value, dict), path, f"expected an object ({cls.__name__})", value)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    for name in value:
        outside = key is not None and name == key[0]
        _expect(name in fields and not outside, _join(path, name), f"unknown field of {cls.__name__}", None)
    out: dict[str, Any] = {key[0]: key[1]} if key is not None else {}
    for name, f in fields.items():
        if key is not None and name == key[0]:
            continue
        if name not in value:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            _expect(not required, _join(path, name), "missing", None)
            continue
        keyed = f.metadata.get(KEYED_BY)
        where = _join(path, name)
        out[name] = _keyed(hints[name], keyed, value[name], where) if keyed else _value(hints[name], value[name], where)
    return cls(**out)


def _keyed(hint: Any, key: str, value: Any, path: str) -> tuple[Any, ...]:
    _expect(isinstance(value, dict), path, f"expected an object of {path.rsplit('.', 1)[-1]}", value)
    element = typing.get_args(hint)[0]
    return tuple(_dataclass(element, item, f"{path}.{name}", key=(key, name)) for name, item in value.items())


def _free(value: Any) -> Any:
    """A free-form value (``Any``): its non-finite strings read back as floats."""
    if isinstance(value, str) and value in NONFINITE:
        return NONFINITE[value]
    if isinstance(value, dict):
        return {k: v if k in _TEXT else _free(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_free(v) for v in value]
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _expect(ok: bool, path: str, message: str, value: Any) -> None:
    if not ok:
        raise ReportError(path, message if value is None else f"{message}, got {_show(value)}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _name(hint: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint) if a is not type(None))
