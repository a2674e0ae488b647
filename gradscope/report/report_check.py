"""Check a report's JSON against the report's dataclasses before reading it back, so that a
truncated, hand-edited or foreign file is refused with the path of its first bad field."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal, Union

from gradscope.report import SEVERITIES, Report


class ReportError(ValueError):
    """A field of a report's JSON does not match the schema: ``path`` names it."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path or 'the report'}: {message}")


def check_report(data: Any) -> None:
    """Raise ``ReportError`` at the first field of ``data`` that ``Report.from_dict`` could not read.

    The JSON form is the dataclasses' with two differences: ``parameters`` maps each name to the
    rest of its fields, and non-finite floats are already read back from their strings.
    """
    _expect(isinstance(data, dict), "", "expected a JSON object", data)
    hints = _hints(Report)
    for name, hint in hints.items():
        if name not in data:
            continue
        if name == "parameters":
            _expect(isinstance(data[name], dict), name, "expected an object of parameters", data[name])
            element = typing.get_args(hint)[0]
            for key, value in data[name].items():
                _dataclass(element, value, f"parameters.{key}", skip=("name",))
        else:
            _value(hint, data[name], name)
    for key in ("run", "steps", "parameters", "anomalies"):
        _expect(key in data, key, "missing", None)


def _value(hint: Any, value: Any, path: str) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return
        for arg in args:
            if arg is type(None):
                continue
            try:
                _value(arg, value, path)
                return
            except ReportError:
                continue
        raise ReportError(path, f"expected {_name(hint)}, got {_show(value)}")
    if origin is Literal:
        _expect(value in args, path, f"expected one of {list(args)}", value)
    elif dataclasses.is_dataclass(hint):
        _dataclass(hint, value, path)
    elif origin in (tuple, list):
        _expect(isinstance(value, list), path, "expected a list", value)
        element = args[0] if args else Any
        for i, item in enumerate(value):
            _value(element, item, f"{path}[{i}]")
    elif origin is dict:
        _expect(isinstance(value, dict), path, "expected an object", value)
        for key, item in value.items():
            _value(args[1] if args else Any, item, f"{path}.{key}")
    elif hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        _expect(number or value in ("nan", "inf", "-inf"), path, "expected a number", value)
    elif hint is int:
        _expect(isinstance(value, int) and not isinstance(value, bool), path, "expected an integer", value)
    elif hint in (str, bool):
        _expect(isinstance(value, hint), path, f"expected {'text' if hint is str else 'true or false'}", value)


def _dataclass(cls: type, value: Any, path: str, skip: tuple[str, ...] = ()) -> None:
    _expect(isinstance(value, dict), path, f"expected an object ({cls.__name__})", value)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    hints = _hints(cls)
    for key in value:
        _expect(key in fields, f"{path}.{key}", f"unknown field of {cls.__name__}", None)
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in value:
            _expect(not required, f"{path}.{name}", "missing", None)
            continue
        _value(hints[name], value[name], f"{path}.{name}")
    if "severity" in fields and "kind" in fields and "message" in fields:  # an Anomaly
        _expect(
            value.get("severity") in SEVERITIES,
            f"{path}.severity",
            f"expected one of {list(SEVERITIES)}",
            value.get("severity"),
        )


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _expect(ok: bool, path: str, message: str, value: Any) -> None:
    if not ok:
        raise ReportError(path, message if value is None else f"{message}, got {_show(value)}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _name(hint: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint) if a is not type(None))
