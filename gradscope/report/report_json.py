"""The report's JSON form: ``report_dict`` writes it, ``report_from`` reads it back.

Both walk the dataclasses (``report_check`` reads each field by its type hint), so a field added
to a dataclass is written and read with no change here. The paths are a public contract (see
``report``); non-finite floats are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` so
that the file is strict JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from typing import Any

from gradscope.report import KEYED_BY, WRITTEN_AS, Report, StepRecord
from gradscope.report.report_check import read_report


def report_dict(report: Report) -> dict[str, Any]:
    """The JSON form (strict: non-finite floats become strings), ``schema_version`` first."""
    out = _encode(report)
    return {"schema_version": out.pop("schema_version"), **out}


def report_text(report: Report) -> str:
    """The JSON report as a file holds it: strict JSON, indented, one newline at the end."""
    return json.dumps(report_dict(report), indent=2, allow_nan=False) + "\n"


def step_dict(step: StepRecord) -> dict[str, Any]:
    """One step's JSON form, as in ``steps[i]`` of the report."""
    return _encode(step)


def report_from(data: dict[str, Any]) -> Report:
    """Read back what ``report_dict`` wrote.

    Raises:
        ReportError: naming the first field that is missing, unknown or of the wrong type.
    """
    return read_report(data)


def _encode(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for name, keyed, written_as in _fields(type(value)):
            item = getattr(value, written_as)() if written_as else getattr(value, name)
            out[name] = _keyed(item, keyed) if keyed else _encode(item)
        return out
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _keyed(elements: tuple[Any, ...], key: str) -> dict[str, Any]:
    """A tuple of dataclasses as an object from each one's ``key`` field to its other fields."""
    out = {}
    for element in elements:
        fields = _encode(element)
        out[fields.pop(key)] = fields
    return out


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, str | None, str | None], ...]:
    return tuple((f.name, f.metadata.get(KEYED_BY), f.metadata.get(WRITTEN_AS)) for f in dataclasses.fields(cls))
