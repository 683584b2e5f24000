"""backend/h2grpc/ is built in layers: each module imports only modules of the
package declared before it in LAYERS (also under `if TYPE_CHECKING:`, also
inside functions), so a lower layer never reaches into a higher one; what it
must call upward is handed to it as a callback or a small Protocol.

The imports are read with `ast` from the source, so an import that only a type
checker would follow counts too. A module missing from LAYERS fails: a new one
must be given its place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "backend.h2grpc"
ROOT = Path(__file__).resolve().parents[2] / "backend" / "h2grpc"

# Lowest first. `__init__` re-exports the public names and sits on top.
LAYERS = [
    "frames",
    "stream",
    "flood",
    "inflow",
    "outflow",
    "pace",
    "headers",
    "liveness",
    "streams",
    "connection",
    "messages",
    "calls",
    "server",
    "__init__",
]
MAX_LINES = 450


def package_imports(source: str, module: str) -> set[str]:
    """The modules of PACKAGE that `source` (the module `module`) imports,
    wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name.split(".")[2])
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                base = node.module.split(".")[0] if node.module else None
            elif node.module == PACKAGE:
                base = None
            elif node.module and node.module.startswith(PACKAGE + "."):
                base = node.module.split(".")[2]
            else:
                continue
            if base is not None:
                found.add(base)
            else:  # from backend.h2grpc import frames, calls
                found.update(alias.name for alias in node.names)
    found.discard(module)
    return found


def violations(sources: dict[str, str], layers: list[str]) -> list[str]:
    rank = {name: i for i, name in enumerate(layers)}
    out = []
    for module, source in sorted(sources.items()):
        if module not in rank:
            out.append(f"{module}: not placed in LAYERS")
            continue
        for imported in sorted(package_imports(source, module)):
            if imported not in rank:
                out.append(f"{module} imports {imported}, which is not placed in LAYERS")
            elif rank[imported] >= rank[module]:
                out.append(f"{module} imports {imported}, a layer at or above its own")
    return out


def _sources() -> dict[str, str]:
    return {path.stem: path.read_text() for path in sorted(ROOT.glob("*.py"))}


def test_every_module_imports_only_layers_below_it() -> None:
    sources = _sources()
    assert set(sources) == set(LAYERS), "LAYERS and backend/h2grpc/*.py differ"
    assert violations(sources, LAYERS) == []


def test_no_module_is_over_the_size_bound() -> None:
    sizes = {name: source.count("\n") for name, source in _sources().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


@pytest.mark.parametrize(
    "source",
    [
        "from backend.h2grpc.connection import Connection\n",
        "from backend.h2grpc import connection\n",
        "import backend.h2grpc.connection\n",
        "from .connection import Connection\n",
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from backend.h2grpc.connection import Connection\n",
        "def later():\n    from backend.h2grpc import calls\n",
    ],
    ids=["from-module", "from-package", "import", "relative", "type-checking", "in-function"],
)
def test_an_upward_import_is_caught_however_it_is_written(source: str) -> None:
    """The checker itself: `stream` importing a higher layer, in every form."""
    sources = {**_sources(), "stream": source}
    found = violations(sources, LAYERS)
    assert len(found) == 1 and found[0].startswith("stream imports "), found
