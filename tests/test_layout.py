"""The package's layout rules: no import circle, no private names across modules, small modules, one API."""

from __future__ import annotations

import ast
from pathlib import Path

import lm_lightning

PACKAGE = Path(lm_lightning.__file__).parent
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """Every ``lm_lightning`` import of a file, function-level ones included: (module, names)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lm_lightning"):
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("lm_lightning")]
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for module, names in _imports(path):
            # ``from lm_lightning.model import checkpointing`` imports the submodule.
            edges |= {f"{module}.{n}" for n in names if f"{module}.{n}" in modules} or {module}
        graph[name] = edges - {name}
    return graph


def test_no_import_circle():
    graph = _graph()
    graph.pop("lm_lightning")  # the package's __init__ re-exports; nothing inside imports it
    for edges in graph.values():
        edges.discard("lm_lightning")
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError(f"import circle: {' -> '.join([*path, node, nxt])}")
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_nothing_inside_the_package_imports_its_top_level():
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py" or path.parent != PACKAGE:
            assert ("lm_lightning", []) not in _imports(path)
            assert all(module != "lm_lightning" for module, _ in _imports(path)), path


def test_no_module_imports_another_modules_private_name():
    for path in PACKAGE.rglob("*.py"):
        for module, names in _imports(path):
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{path.relative_to(PACKAGE)} imports {private} from {module}"


def test_modules_are_small():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= MAX_LINES, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_public_api_is_exported_and_versioned():
    for name in lm_lightning.__all__:
        assert getattr(lm_lightning, name) is not None
    from importlib.metadata import version

    assert lm_lightning.__version__ == version("lm_lightning")
