"""The image's cached dependency layer can run install.sh's import check.

Dockerfile.python runs ./install.sh in a layer that has only the files the COPY lines
before it name, so that code changes reuse that (slow) layer. A check in install.sh that
imports a worker module not copied there broke the CPU image once (`No module named
'backend.h2grpc'`), and nothing noticed until the image was built by hand. These tests
build that layer's file set from the Dockerfile itself and run the check in it, with
this checkout's venv, in seconds — no container engine needed. The full image build
stays `tests/image/local_build.sh` (README: when to run it).

Needs the installed venv (vLLM, torch): the check imports them.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def dependency_layer_sources(dockerfile: str) -> list[str]:
    """Paths COPY'd into the builder stage before the RUN that calls ./install.sh."""
    sources: list[str] = []
    logical = dockerfile.replace("\\\n", " ").splitlines()
    for line in logical:
        words = shlex.split(line, comments=True)
        if not words:
            continue
        op = words[0].upper()
        if op == "FROM":
            sources = []  # a new stage starts from nothing
        elif op == "COPY" and not any(w.startswith("--from") for w in words):
            args = [w for w in words[1:] if not w.startswith("--")]
            sources.extend(args[:-1])
        elif op == "RUN" and "./install.sh" in line:
            return sources
    raise AssertionError("Dockerfile.python has no RUN of ./install.sh")


def test_the_layer_parser_finds_the_install_step():
    sources = dependency_layer_sources((ROOT / "Dockerfile.python").read_text())
    assert "install.sh" in sources and "requirements.txt" in sources
    assert "backend/__init__.py" in sources
    # Only what install.sh needs: copying the whole tree would rebuild the layer
    # on every code change.
    assert "." not in sources and "backend" not in sources


def test_install_import_check_runs_in_the_dependency_layer(tmp_path):
    layer = tmp_path / "backend-layer"
    for pattern in dependency_layer_sources((ROOT / "Dockerfile.python").read_text()):
        matches = sorted(ROOT.glob(pattern))
        assert matches, f"COPY source {pattern!r} matches nothing in the checkout"
        for src in matches:
            dst = layer / src.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    # What install.sh itself produces in that layer: the venv (this checkout's) and
    # the stubs it generates from backend.proto.
    (layer / "venv").symlink_to(ROOT / "venv")
    shutil.copytree(ROOT / "backend" / "gen", layer / "backend" / "gen")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        ["bash", str(layer / "install.sh"), "--check-imports"],
        cwd=layer,
        env={**env, "BUILD_PROFILE": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (
        "install.sh's import check fails in the image's dependency layer, which has only "
        f"{sorted(str(p.relative_to(layer)) for p in layer.rglob('*') if p.is_file())[:20]}:\n"
        f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    )
    assert "imports OK" in done.stdout


def test_check_imports_finds_every_worker_module():
    """Every .py file under backend/, subpackages (backend/h2grpc/) included, is
    one check_imports imports (but the entry point)."""
    from tools.check_imports import worker_modules

    files = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / "backend").rglob("*.py")
    }
    assert files - {"backend.__main__"} == set(worker_modules())


def test_every_worker_module_imports():
    """What the Dockerfile's last builder step runs once the sources are copied."""
    done = subprocess.run(
        [sys.executable, "-m", "tools.check_imports"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "worker modules import OK" in done.stdout
