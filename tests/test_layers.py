"""The package's import structure: every module imports only modules of its own layer or below it, and no
import cycle exists (counting the imports inside functions too, so lazy imports cannot hide one).

    models <- sampling / checkpoints / adapters <- conditioning / latents / options <- pipeline <- interfaces / training

Leaves that everything may use: `dtypes`, `builtin`, `images`, `acceleration`, `prompts` (torch-free syntax). The package's `__init__` is the
public face (`sdxl.load` imports the pipeline when first used), so it is on top; importing it for its version is
allowed anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sdxl"

LAYERS = {  # the first part of a module's name under sdxl -> its layer
    "__init__": 4, "dtypes": 0, "builtin": 0, "images": 0, "acceleration": 0, "models": 0, "data": 0, "prompts": 0,
    "sampling": 1, "checkpoints": 1, "adapters": 1,
    "conditioning": 2, "latents": 2, "options": 2, "previews": 2,
    "pipeline": 3,
    "interfaces": 4, "training": 4, "__main__": 4,
}
FORBIDDEN = {"training": {"pipeline", "interfaces"}}  # training conditions through `conditioning`, never the pipeline


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The sdxl modules `path` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sdxl"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sdxl":
                continue
            found.add(target)
            for alias in node.names:  # `from . import sampling` names a module
                if (SRC.parent / (target + "." + alias.name).replace(".", "/")).with_suffix(".py").exists() or (
                        SRC.parent / (target + "." + alias.name).replace(".", "/") / "__init__.py").exists():
                    found.add(target + "." + alias.name)
    return found - {name}


def layer(module: str) -> tuple[int, str]:
    top = module.split(".")[1] if "." in module else "__init__"
    assert top in LAYERS, f"{module}: not in the layer table of tests/test_layers.py"
    return LAYERS[top], top


GRAPH = {module_name(p): imports(p) for p in SRC.rglob("*.py")}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    level, top = layer(module)
    for target in GRAPH[module]:
        if target == "sdxl":  # the package's own __init__ (its version)
            continue
        their_level, their_top = layer(target)
        assert their_level <= level, f"{module} (layer {level}) imports {target} (layer {their_level})"
        assert their_top not in FORBIDDEN.get(top, ()), f"{module} imports {target}"


def test_no_import_cycles():
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt == "sdxl" or nxt not in GRAPH:
                continue
            if seen.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = 2

    for module in sorted(GRAPH):
        if module not in seen:
            visit(module, [module])


def test_the_table_covers_every_module():
    assert {layer(m)[1] for m in GRAPH} <= set(LAYERS)
