"""Read a YAML config once: decoded by its byte-order mark, parsed by libyaml where installed,
with the line of every key, duplicate keys and runaway nesting or alias expansion refused.

The line map, the checks and the values all come from one composed node tree, so a file is
parsed once whatever its size.
"""

from __future__ import annotations

import codecs
import re
from typing import Any

import yaml

from gradscope.errors import ConfigError

MAX_DEPTH = 100  # mappings and lists nested deeper than this are no config
MAX_NODES = 200_000  # nodes after alias expansion: a real config has hundreds

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml is ~10x faster where installed

# YAML 1.1 (PyYAML's dialect) reads 1e-8 as a string: it wants a dot (1.0e-8). YAML 1.2 and every
# user mean a number; read it as one.
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _Loader(_Base):
    """Safe loading (no Python tags) with YAML 1.2 exponent floats."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789"))

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def decode(data: bytes, source: str) -> str:
    """The text of a config file: UTF-8, or UTF-16/32 with a byte-order mark.

    Raises:
        ConfigError: the bytes are in another encoding (names the line and the byte).
    """
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    if encoding == "utf-8" and b"\x00" in data:
        line = data[: data.index(b"\x00")].count(b"\n") + 1
        raise ConfigError(
            [("", f"line {line}: a NUL byte: UTF-16 or UTF-32 without a byte-order mark? save the file as UTF-8")],
            source,
        )
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        bad = data[exc.start : exc.start + 1].hex()
        raise ConfigError(
            [("", f"line {line}: not valid {encoding} (byte 0x{bad}, perhaps Latin-1): save the file as UTF-8")],
            source,
        ) from None


def parse(text: str, source: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The config's mapping and the 1-based line of each key path in it.

    Raises:
        ConfigError: not YAML, not a mapping, a key given twice, or nested or expanded beyond reason.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        _Walk(source, lines).visit(node, "", 0)
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise ConfigError([("", _describe(exc))], source) from None
    except RecursionError:
        raise ConfigError([("", f"nested more than {MAX_DEPTH} levels deep")], source) from None
    finally:
        loader.dispose()
    if not isinstance(raw, dict):
        raise ConfigError([("", f"expected a mapping of keys (model:, data:, ...), got {type(raw).__name__}")], source)
    return raw, lines


class _Walk:
    """One pass over the node tree: line of each key, duplicate keys, depth and size limits."""

    def __init__(self, source: str, lines: dict[str, int]) -> None:
        self.source, self.lines, self.nodes = source, lines, 0

    def visit(self, node: yaml.Node | None, path: str, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self._error(_top(path), f"expands to more than {MAX_NODES} values (aliases of aliases?)")
        if depth > MAX_DEPTH:
            raise self._error(_top(path), f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, yaml.MappingNode):
            self._mapping(node, path, depth)
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                child = f"{path}[{i}]"
                self.lines.setdefault(child, value.start_mark.line + 1)
                self.visit(value, child, depth + 1)

    def _mapping(self, node: yaml.MappingNode, path: str, depth: int) -> None:
        seen: dict[Any, int] = {}
        for key, value in node.value:
            line = key.start_mark.line + 1
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                name = key.value
                if (key.tag, name) in seen:
                    first = seen[(key.tag, name)]
                    raise self._error(f"{path}.{name}" if path else name, f"given twice, on lines {first} and {line}")
                seen[(key.tag, name)] = line
                child = f"{path}.{name}" if path else str(name)
                self.lines.setdefault(child, line)
            else:
                child = path
            self.visit(value, child, depth + 1)

    def _error(self, path: str, message: str) -> ConfigError:
        return ConfigError([(path, message)], self.source, self.lines)


def _top(path: str) -> str:
    """The top-level key of a path (a runaway path is too long to print)."""
    return re.split(r"[.\[]", path, maxsplit=1)[0]


def _describe(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return f"{where}not valid YAML: {problem}"
