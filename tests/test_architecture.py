"""The package's import structure: no import circle, and no import from a lower stage to a higher one.

Imports are read from the source (``ast``), function-level ones included, so a lazy import cannot hide
a dependency. Stages, lowest first, follow the pipeline (DESIGN.md): the config schema and the
foundations under everything, then data, models, privacy and robustness, training, audits, the
renderers of results, reports, and the pipeline with its entry points on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dptrain"

# Each module's stage: the longest matching prefix wins. Modules of one stage may import each other
# (without circles); a module may import any lower stage.
STAGES = {
    "dptrain.errors": 0,
    "dptrain.seeds": 0,
    "dptrain.config": 0,
    "dptrain.tracking": 1,
    "dptrain.data": 2,
    "dptrain.models": 2,
    "dptrain.privacy": 3,
    "dptrain.robust": 3,
    "dptrain.poisoning": 3,
    "dptrain.adversarial": 3,
    "dptrain.watermark": 3,
    "dptrain.training": 4,
    "dptrain.audit": 5,
    "dptrain.views": 6,
    # The Flower engine (the federated recipe with Flower ClientApps, which the pipeline picks), the
    # strategy, the client mod and the audit helper for Flower apps: above training and the audits.
    "dptrain.flower": 6,
    "dptrain.report": 7,
    "dptrain.validation": 8,
    "dptrain.pipeline": 8,
    "dptrain.preflight": 9,
    "dptrain.cli": 9,
    # The deployable Flower app runs the whole pipeline, as the CLI does.
    "dptrain.flower_app": 9,
    "dptrain.__main__": 10,
    "dptrain": 0,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """The dptrain modules ``path`` imports (``from dptrain.x import y`` counts as dptrain.x.y when
    that is a module, else dptrain.x)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {module for module in found if module in MODULES and module != name}


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _stage(name: str) -> int:
    return STAGES[max((prefix for prefix in STAGES if name == prefix or name.startswith(prefix + ".")), key=len)]


def test_every_module_has_a_stage():
    assert all(_stage(name) is not None for name in MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_higher_stage(name):
    upward = sorted(other for other in GRAPH[name] if _stage(other) > _stage(name))
    assert not upward, f"{name} (stage {_stage(name)}) imports {upward}"


def test_there_is_no_import_circle():
    # Tarjan's strongly connected components: a component of more than one module is a circle.
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in GRAPH[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert not circles, circles
