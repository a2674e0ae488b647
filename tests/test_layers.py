"""The package's layers: each imports only those below it, no import circle, no private name across files.

An AST walk over every module of ``gradscope/``. For the layers every import counts, inside functions and
under ``TYPE_CHECKING`` too (a lazy import is still a dependency); so no circle can cross two layers. An
import circle is one the interpreter meets: the imports a module runs when it is imported (a dataclass's
method may still import, on call, the module of its own layer that writes it as JSON).
"""

from __future__ import annotations

import ast
from pathlib import Path

from gradscope.utils.moved import MOVED

PACKAGE = Path(__file__).resolve().parent.parent / "gradscope"

# Lowest first; a module may import its own layer and those before it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("gradscope.version", "gradscope.errors", "gradscope.utils"),
    ("gradscope.report",),
    ("gradscope.config",),
    ("gradscope.rules",),
    ("gradscope.probes",),
    ("gradscope.locate",),
    ("gradscope.observe",),
    ("gradscope.reporters",),
    ("gradscope.runner",),
    ("gradscope.api", "gradscope.integrations"),
    ("gradscope.cli",),
    ("gradscope", "gradscope.__main__"),
)

# (importer, imported) pairs against the order, still to be undone: this list only shrinks.
ALLOWED: set[tuple[str, str]] = {
    ("gradscope.report.report", "gradscope.reporters.terminal"),  # Report.print
}


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path, on_import: bool = False) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every gradscope import in the file (``on_import``: only
    those that run when the file is imported, not those inside functions or under ``TYPE_CHECKING``)."""
    module = _name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in _run_on_import(tree) if on_import else ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "gradscope"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "gradscope":
                continue
            names = [alias.name for alias in node.names]
            submodules = [n for n in names if _exists(f"{base}.{n}")]  # `from gradscope.locate import replay`
            found += [(f"{base}.{n}", []) for n in submodules]
            rest = [n for n in names if n not in submodules]
            if rest or not submodules:
                found.append((base, rest))
    return found


def _run_on_import(tree: ast.Module) -> list[ast.stmt]:
    """The statements of the module body and of the blocks it runs (try, if), except ``if TYPE_CHECKING``."""
    out: list[ast.stmt] = []
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return out


def _graph(on_import: bool = False) -> dict[str, list[tuple[str, list[str]]]]:
    return {_name(path): _imports(path, on_import) for path in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    best, layer = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, layer = len(name), i
    assert layer >= 0, f"{module} is in no layer: add it to LAYERS"
    return layer


def _against_the_order() -> set[tuple[str, str]]:
    return {
        (importer, imported)
        for importer, imports in _graph().items()
        for imported, _ in imports
        if _layer(imported) > _layer(importer)
    }


def test_every_module_imports_only_its_layer_and_those_below() -> None:
    assert sorted(_against_the_order() - ALLOWED) == []


def test_the_allowed_exceptions_only_shrink() -> None:
    assert sorted(ALLOWED - _against_the_order()) == [], "undone: remove them from ALLOWED"


def test_no_import_circle() -> None:
    edges = {m: {i for i, _ in imports if i != m} for m, imports in _graph(on_import=True).items()}
    circles = [c for c in _strongly_connected(edges) if len(c) > 1]
    assert circles == []


def test_no_private_name_is_imported_from_another_file() -> None:
    private = [
        (importer, imported, name)
        for importer, imports in _graph().items()
        for imported, names in imports
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


def test_the_package_imports_its_modules_where_they_are() -> None:
    old = [(m, i) for m, imports in _graph().items() for i, _ in imports if i in MOVED or not _exists(i)]
    assert old == []


def test_few_modules_at_the_top() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``edges`` (module -> modules it imports)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_a_known_import() -> None:
    # the walk itself: resolves `from gradscope.locate import replay` to the module
    imported = {i for i, _ in _graph()["gradscope.locate.capture"]}
    assert "gradscope.locate.replay" in imported


def test_the_config_names_every_optional_probe() -> None:
    from gradscope.config.names import PROBE_NAMES
    from gradscope.probes import OPTIONAL

    assert sorted(PROBE_NAMES) == sorted(OPTIONAL)
