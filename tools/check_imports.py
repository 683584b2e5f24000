"""Import every module of the worker (`backend/`), so a missing dependency fails here.

`python -m tools.check_imports` — the last step of Dockerfile.python's builder stage
runs it once the sources are copied (install.sh's own import check, which runs in the
cached dependency layer, covers third-party packages and the stubs only), and
tests/unit/test_image_layers.py runs it too. `backend.__main__` is left out: importing
it is harmless, but it is the entry point, not a module anything imports.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys


def worker_modules() -> list[str]:
    import backend

    names = ["backend"]
    for info in pkgutil.walk_packages(backend.__path__, "backend."):
        if info.name != "backend.__main__":
            names.append(info.name)
    return sorted(names)


def main() -> int:
    failed = []
    names = worker_modules()
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # report every failing module, not just the first
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    if failed:
        print("worker modules that do not import:", *failed, sep="\n  ", file=sys.stderr)
        return 1
    print(f"check_imports: {len(names)} worker modules import OK ({sys.executable})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
