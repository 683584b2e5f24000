"""The end-to-end harness (tests/e2e/harness.py) with its defaults, as `make test-e2e` runs it.

It packages the worker directory if needed, starts it through run.sh like the gateway,
drives every default capability over gRPC against the tiny model and stops it again.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# The BACKEND_TEST_* variables select what the harness does; the test runs the defaults.
_HARNESS_ENV = ("BACKEND_TEST_",)


def test_harness_defaults_all_pass(tiny_model_dir):  # built once, under the build lock
    env = {k: v for k, v in os.environ.items() if not k.startswith(_HARNESS_ENV)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "e2e" / "harness.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, output
    assert lines, output
    assert re.fullmatch(r"\d+ passed, 0 failed", lines[-1]), output
    assert int(lines[-1].split()[0]) >= 12, output  # every default capability + shutdown
    assert not [line for line in lines if line.startswith(("FAIL", "SKIP"))], output
