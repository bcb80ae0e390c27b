"""The package's layers: ``core <- transforms <- cli``, no import circles, and a core that
leaves Beam unimported."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "beam_caption"
LAYERS = ("core", "transforms", "cli")  # each may import only those before it


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports (anywhere in it)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:  # ``from package import module`` names the module
                    submodule = f"{node.module}.{alias.name}"
                    imported.add(submodule if submodule in _module_names() else node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        graph[_module_name(path)] = {name for name in imported
                                     if name.split(".")[0] in ("beam_caption", "apache_beam")}
    return graph


def _module_names() -> set[str]:
    return {_module_name(path) for path in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for module, imported in _imports().items():
        layer = _layer(module)
        if layer is None:
            continue
        for name in imported:
            if name.startswith("apache_beam") and LAYERS[layer] == "core":
                wrong.append(f"{module} imports {name}")
            other = _layer(name)
            # the fake server is the CLI's demo, never the library's
            testing = name.startswith("beam_caption.testing") and LAYERS[layer] != "cli"
            if testing or (other is not None and other > layer):
                wrong.append(f"{module} imports {name}")
    assert wrong == []


def test_no_module_imports_itself_through_others():
    modules = _module_names()
    graph = {module: {name for name in imported if name in modules}
             for module, imported in _imports().items()}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for name in graph[module]:
            if name in path:
                circles.append(" -> ".join(path[path.index(name):] + [name]))
            elif name not in done:
                visit(name, path + [name])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert circles == []


def test_importing_the_core_leaves_beam_out():
    code = ("import sys, pkgutil, importlib, beam_caption.core as core\n"
            "for info in pkgutil.iter_modules(core.__path__):\n"
            "    importlib.import_module('beam_caption.core.' + info.name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'apache_beam'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]"
