"""The folders are the layers: every import inside tlkit runs downwards, and none runs in a circle.

Function-level imports count as much as module-level ones: a lazy import only hides a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tlkit"

# Lowest first. A module may import its own layer and the layers below it.
LAYERS = (
    ("ground", ("tlkit", "tlkit.errors", "tlkit.console", "tlkit.choices", "tlkit.config")),
    ("ground", ("tlkit.metrics", "tlkit.runfolder")),
    ("data", ("tlkit.data",)),
    ("model", ("tlkit.model",)),
    ("infer", ("tlkit.infer",)),
    ("train", ("tlkit.train",)),
    ("commands", ("tlkit.commands",)),
    ("cli", ("tlkit.cli", "tlkit.cli_reference")),
)
LAYER_NAMES = list(dict.fromkeys(name for name, _ in LAYERS))
# A config without `img_size` asks the backbone for its pretrained input size, when needed.
ALLOWED_UPWARD = {("tlkit.config", "tlkit.model.backbones")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The index in LAYER_NAMES of the layer holding `module` (its longest matching prefix)."""
    matches = [
        (len(prefix), LAYER_NAMES.index(name))
        for name, prefixes in LAYERS
        for prefix in prefixes
        if module == prefix or (prefix != "tlkit" and module.startswith(prefix + "."))
    ]
    assert matches, f"{module} is in no layer: add its folder to LAYERS"
    return max(matches)[1]


def imported_modules(path: Path) -> set[str]:
    """The tlkit modules `path` imports, wherever the import statement is."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names if alias.name.startswith("tlkit")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tlkit"):
            for alias in node.names:  # `from tlkit.data import shards` imports a module
                submodule = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / submodule.replace(".", "/")).with_suffix(".py")
                modules.add(submodule if is_module.is_file() else node.module)
    return modules


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path) for path in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("module", sorted(import_graph()))
def test_imports_run_downwards(module: str):
    graph = import_graph()
    upward = [
        imported
        for imported in graph[module]
        if imported != "tlkit"  # the package itself: `__version__`, light
        and layer(imported) > layer(module)
        and (module, imported) not in ALLOWED_UPWARD
    ]
    assert not upward, f"{module} ({LAYER_NAMES[layer(module)]}) imports upwards: {upward}"


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            if imported == "tlkit" or (module, imported) in ALLOWED_UPWARD:
                continue
            if state.get(imported) == "open":
                circle = path[path.index(imported) :] + [imported]
                raise AssertionError(f"import circle: {' -> '.join(circle)}")
            if imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_every_subpackage_says_what_it_holds():
    """`ls tlkit` shows the layers; each package's docstring names its modules."""
    for init in PACKAGE.glob("*/__init__.py"):
        text = ast.get_docstring(ast.parse(init.read_text())) or ""
        for module in init.parent.glob("*.py"):
            if module.name != "__init__.py":
                assert f"`{module.stem}`" in text, f"{init} does not name {module.stem}"
