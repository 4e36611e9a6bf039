"""The layering the project promises, read from the code's own import statements.

Every import counts, a lazy one inside a function too: a circle of lazy imports still ties
the modules into one piece that cannot be understood, tested or moved alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

PACKAGE = "napari_r2au"
#: the top of the house: the docks, napari's reader/writer/sample adapters and the CLI
#: (its `demo --gui`) may import napari, Qt and magicgui; nothing below them may
GUI_MODULES = {"cli", "_reader", "_writer", "_sample_data"}
GUI_PACKAGES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy")


def _modules() -> dict[str, Path]:
    """Module name -> file, for the package and the trainer (installed as napari_r2au.training)."""
    found = {}
    for base, prefix in ((ROOT / PACKAGE, PACKAGE), (ROOT / "training", f"{PACKAGE}.training")):
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((prefix, *parts))] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """The project's modules and the outside top-level packages that a module imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [(base, [alias.name for alias in node.names])]
        else:
            continue
        for module, names in targets:
            if module.split(".")[0] != PACKAGE:
                outside.add(module.split(".")[0])
                continue
            submodules = {f"{module}.{n}" for n in names if f"{module}.{n}" in modules}
            inside |= submodules or {module}
            if submodules and len(submodules) < len(names):
                inside.add(module)
    inside.discard(name)
    return {m for m in inside if m in modules}, outside


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    edges, outside = {}, {}
    for name, path in modules.items():
        edges[name], outside[name] = _imports(name, path, modules)
    return edges, outside


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

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
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def test_the_reader_finds_a_circle_when_there_is_one():
    """The check below is only as good as its reading of imports: two known edges."""
    edges, outside = _graph()
    assert "napari_r2au.preprocess" in edges["napari_r2au.engine"]  # from .preprocess import ...
    assert "napari_r2au.device" in edges["napari_r2au.training.trainer"]  # from napari_r2au.device import
    assert "napari" in outside["napari_r2au.widgets.segment"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_back_in_a_circle():
    # the package's __init__ only names the public API lazily; edges into it are not layering
    edges = {name: targets - {PACKAGE} for name, targets in _graph()[0].items()}
    assert _cycles(edges) == []


def test_nothing_below_the_docks_imports_napari_or_qt():
    """The engine, model files, trainer and worklist run headless (CLI, scripts, CI)."""
    _, outside = _graph()
    offenders = {
        name: sorted(set(packages) & set(GUI_PACKAGES))
        for name, packages in outside.items()
        if set(packages) & set(GUI_PACKAGES)
        and not name.startswith(f"{PACKAGE}.widgets")
        and name.rpartition(".")[2] not in GUI_MODULES
    }
    assert offenders == {}
