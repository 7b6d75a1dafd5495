"""A run imports only what it uses: the heavy libraries of optional stages load where those stages run."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dptrain

PACKAGE = Path(dptrain.__file__).parent
# Loaded lazily, inside the functions that use them: a default job (digits, no sensitive attribute,
# no sanitizer, no report) needs none of their fitting or plotting code.
LAZY = ("sklearn", "matplotlib")
# The report command's figures are matplotlib's, and nothing a run imports loads this module.
PLOTTING = {"dptrain.report.figures"}


def _module_level_imports(path: Path) -> set[str]:
    """Top-level packages imported when the module at ``path`` is imported (not inside functions)."""
    found = set()
    pending = list(ast.parse(path.read_text()).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            pending += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]
    return found


def test_no_module_imports_sklearn_or_matplotlib_when_it_is_imported():
    eager = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        heavy = sorted(_module_level_imports(path) & set(LAZY))
        if heavy and name not in PLOTTING:
            eager[name] = heavy
    assert not eager


def test_importing_the_cli_loads_no_heavy_library():
    probe = "import sys, dptrain.cli; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert not {"matplotlib", "scipy", "sklearn", "tensorboard"} & set(ast.literal_eval(loaded))
