"""On a fresh clone the suite's test processes build the tiny model themselves:
two at once must both get it, built once, and neither wait for itself.

CI hung on this (2026-12-06): the session fixture took a lock file and the build
took the same file again in the same process; flock locks belong to the open
file, so the first process waited for itself and the second for the first, until
CI's 90 minutes ran out. A machine where the model was already built never saw it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BUILD = "from tests.conftest import tiny_model_path; print(tiny_model_path())"


def _fresh_clone(dest: Path) -> Path:
    """The repository's tracked files as they are in this working tree, with no
    .cache: the fixture's default model directory is the clone's own."""
    files = subprocess.run(
        ["git", "ls-files", "tests", "tools"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


def test_two_test_processes_build_the_tiny_model_once_on_a_fresh_clone(tmp_path: Path) -> None:
    clone = _fresh_clone(tmp_path / "clone")
    target = clone / ".cache" / "tiny-model"
    env = {k: v for k, v in os.environ.items() if k != "TINY_MODEL_DIR"}
    env["PYTHONPATH"] = str(clone)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD],
            cwd=clone,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(
                "a process building the tiny model waited 120 s: a lock cycle"
            ) from None
        assert p.returncode == 0, err[-2000:]
        results.append(out.strip().splitlines()[-1])
    assert results == [str(target)] * 2
    assert (target / "config.json").is_file()
    # Built once: nothing temporary or replaced left beside it.
    left = sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock"))
    assert left == ["tiny-model"]
