"""The ALONE rule of tests/conftest.py, run for real: two pytest-xdist processes,
the suite's own conftest, a module named like test_inbound and another one.

- No test of the other module runs while an ALONE test's call runs (its latency
  verdicts need the machine as quiet as the suite can make it), nor a worker
  stop that module's fixture left running in the background (conftest.retire).
- An ALONE module's fixture setup runs beside the other process: its fixture
  waits until the other module has run two more tests (whose first test waits
  for that setup to begin, so the order of the two processes' starts does not
  matter). Before the rule covered only the call, setup ran under the exclusive
  lock and nothing else ran (the fixture's wait times out, the test fails).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)

ALONE_MODULE = """
import json, os, time
from pathlib import Path

import pytest

LOG = Path(os.environ["ALONE_LOG"])


def record(kind, start):
    with LOG.open("a") as f:
        f.write(json.dumps([kind, start, time.monotonic()]) + "\\n")


@pytest.fixture(scope="module")
def box():
    start = time.monotonic()
    record("setup-start", start)
    before = len(others())
    while time.monotonic() - start < 30:  # two tests of the other module run meanwhile
        if len(others()) >= before + 2:
            break
        time.sleep(0.05)
    record("setup", start)
    yield


def others():
    return [line for line in LOG.read_text().splitlines() if '"other"' in line]


@pytest.mark.parametrize("n", range(3))
def test_alone(box, n):
    start = time.monotonic()
    time.sleep(0.3)
    record("alone", start)
"""

OTHER_MODULE = """
import json, os, subprocess, time
from pathlib import Path

import pytest

from tests.conftest import retire

LOG = Path(os.environ["ALONE_LOG"])


class StoppingWorker:
    \"\"\"What retire() stops: 3 s of stopping, like an engine's.\"\"\"

    def __init__(self):
        self.proc = subprocess.Popen(["sleep", "60"], start_new_session=True)

    def stop(self):
        start = time.monotonic()
        time.sleep(3)
        with LOG.open("a") as f:
            f.write(json.dumps(["stop", start, time.monotonic()]) + "\\n")


@pytest.mark.parametrize("n", range(40))
def test_other(n):
    if n == 0:  # the module must not end before the ALONE module's setup begins
        deadline = time.monotonic() + 30
        while '"setup-start"' not in LOG.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    if n == 1:  # stopped in the background while the ALONE module wants its first call
        retire(StoppingWorker())
    start = time.monotonic()
    time.sleep(0.1)
    with LOG.open("a") as f:
        f.write(json.dumps(["other", start, time.monotonic()]) + "\\n")
"""


def test_alone_calls_run_alone_and_their_setup_does_not(tmp_path: Path) -> None:
    tests = tmp_path / "tests"
    (tests / "reliability").mkdir(parents=True)
    for name in ("conftest.py", "suite_timing.py", "__init__.py"):
        shutil.copy(ROOT / "tests" / name, tests / name)
    (tests / "reliability" / "__init__.py").write_text("")
    (tests / "reliability" / "test_inbound.py").write_text(ALONE_MODULE)
    (tests / "test_other.py").write_text(OTHER_MODULE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    log = tmp_path / "intervals.jsonl"
    log.write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile", "-p", "xdist"],
        cwd=tmp_path,
        env={"ALONE_LOG": str(log), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    alone = [(s, e) for kind, s, e in rows if kind == "alone"]
    other = [(s, e) for kind, s, e in rows if kind == "other"]
    (setup,) = [(s, e) for kind, s, e in rows if kind == "setup"]
    assert len(alone) == 3 and len(other) == 40, rows
    stops = [(s, e) for kind, s, e in rows if kind == "stop"]
    assert len(stops) == 1, rows
    overlaps = [(a, o) for a in alone for o in other + stops if o[0] < a[1] and a[0] < o[1]]
    assert not overlaps, f"other tests or a background stop ran during an ALONE call: {overlaps}"
    beside = [o for o in other if setup[0] <= o[0] and o[1] <= setup[1]]
    assert len(beside) >= 2, f"the ALONE fixture's setup ran alone: {setup}, {other}"
