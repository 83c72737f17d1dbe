"""Import structure: no import cycles, every module importable first, models free of weights."""

from __future__ import annotations

import ast
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

import napari_sam

PACKAGE_DIR = Path(napari_sam.__file__).parent


def _modules() -> list[str]:
    # From the files, not pkgutil.walk_packages: that imports packages and silently skips
    # those that fail to import, which is what these tests look for.
    names = []
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            names.append(".".join(("napari_sam", *parts)))
    return sorted(names)


MODULES = _modules()


def _module_file(name: str) -> Path:
    parts = name.split(".")[1:]
    package = PACKAGE_DIR.joinpath(*parts, "__init__.py")
    return package if package.is_file() else PACKAGE_DIR.joinpath(*parts).with_suffix(".py")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(name: str) -> set[str]:
    """The napari_sam modules ``name`` imports when it is imported (not inside functions)."""
    tree = ast.parse(_module_file(name).read_text(encoding="utf-8"))
    is_package = _module_file(name).name == "__init__.py"
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                found.add(module)
                # ``from package import submodule`` imports the submodule.
                found.update(f"{module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    modules: set[str] = set()
    for target in found:
        if target in MODULES:
            # Importing a.b.c runs a/__init__ and a/b/__init__ first.
            parts = target.split(".")
            modules.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    # A module's own packages are initialised before it (they are not a cycle); a package using
    # a name of its submodule before defining it would be, and the fresh-interpreter tests
    # below catch that.
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    return {m for m in modules - ancestors if m in MODULES}


def test_module_list_is_complete():
    assert "napari_sam.weights.loading" in MODULES and "napari_sam.models.build" in MODULES
    assert all(_module_file(m).is_file() for m in MODULES)


def test_top_level_imports_have_no_cycle():
    graph = {name: _top_level_imports(name) for name in MODULES}
    # A module imported by one of its own dependencies: follow the edges depth first.
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for name in MODULES:
        if name not in state:
            visit(name)
    # The check sees real edges (it is not vacuously passing on an empty graph).
    assert "napari_sam.weights.cache" in graph["napari_sam.weights.loading"]
    assert "napari_sam.models.sam" in graph["napari_sam.models.build"]


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=None,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("order", ["alphabetical", "reversed", "shuffled"])
def test_every_module_imports_in_a_fresh_interpreter(order):
    names = list(MODULES)
    if order == "reversed":
        names.reverse()
    elif order == "shuffled":
        random.Random(13).shuffle(names)
    out = _run(
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('napari_sam'))))\n"
    )
    assert set(MODULES) <= set(json.loads(out))


def test_models_never_import_weights():
    models = [m for m in MODULES if m.startswith("napari_sam.models.")]
    out = _run(
        "import importlib, json, sys\n"
        f"for name in {models!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('napari_sam'))))\n"
    )
    loaded = set(json.loads(out))
    assert "napari_sam.models.build" in loaded
    # The model tree needs only the registry (specs) besides itself.
    assert {m for m in loaded if not m.startswith("napari_sam.models")} == {
        "napari_sam",
        "napari_sam.registry",
    }
    for name in models:
        deps = _top_level_imports(name)
        assert all(d.startswith("napari_sam.models") or d == "napari_sam.registry" for d in deps)
