"""What the suite spends its time on: engine starts and wall time per test module,
printed after pytest's slowest durations (`engine starts per module`).

An engine start is a new vLLM engine core process (`VLLM::EngineCore`) under the
test process, whoever started it (a pooled worker, a test's own worker, `vllm
serve`, the e2e harness): a thread looks at the process tree every 0.25 s (an
engine core lives for seconds at least) and charges each new one to the module
whose test was running. Under pytest-xdist each test process counts its own and
sends the counts to the controller, which prints the table.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter, defaultdict

import psutil
import pytest

ENGINE_CORE = "VLLM::EngineCor"  # the kernel's 15-character name of VLLM::EngineCore


class _Counter:
    def __init__(self) -> None:
        self.current = "<collection>"
        self.starts: Counter[str] = Counter()
        self._seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-starts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(5)
            self._look()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._look()

    def _look(self) -> None:
        try:
            children = psutil.Process(os.getpid()).children(recursive=True)
        except psutil.Error:
            return
        for p in children:
            if p.pid in self._seen:
                continue
            try:
                if not p.name().startswith(ENGINE_CORE):
                    continue
            except psutil.Error:
                continue
            self._seen.add(p.pid)
            self.starts[_module(self.current)] += 1


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


_counter = _Counter()
_wall: dict[str, float] = defaultdict(float)
_tests: Counter[str] = Counter()
_remote_starts: Counter[str] = Counter()
_began = time.monotonic()


def pytest_sessionstart(session: pytest.Session) -> None:
    # The xdist controller's children are the test processes: they count.
    controller = getattr(session.config.option, "numprocesses", None) and not os.environ.get(
        "PYTEST_XDIST_WORKER"
    )
    if not controller:
        _counter.start()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    _counter.current = item.nodeid
    yield


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    module = _module(report.nodeid)
    _wall[module] += report.duration
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _tests[module] += 1


def pytest_sessionfinish(session: pytest.Session) -> None:
    _counter.stop()
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist test process: hand the counts on
        workeroutput["engine_starts"] = json.dumps(dict(_counter.starts))


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown without xdist
def pytest_testnodedown(node, error) -> None:  # type: ignore[no-untyped-def]
    """xdist controller: a test process finished; add its engine starts."""
    raw = getattr(node, "workeroutput", {}).get("engine_starts")
    if raw:
        _remote_starts.update(json.loads(raw))


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if getattr(terminalreporter.config, "workerinput", None) is not None:
        return
    starts = _counter.starts + _remote_starts
    modules = sorted(set(_wall) | set(starts))
    if not modules:
        return
    tr = terminalreporter
    tr.section("engine starts per module")
    tr.write_line(f"{'module':58s} {'tests':>5s} {'starts':>6s} {'wall s':>8s}")
    for m in modules:
        tr.write_line(f"{m:58s} {_tests[m]:5d} {starts[m]:6d} {_wall[m]:8.1f}")
    tr.write_line(
        f"{'total (wall: sum over tests; elapsed below)':58s} {sum(_tests.values()):5d} "
        f"{sum(starts.values()):6d} {sum(_wall.values()):8.1f}"
    )
    tr.write_line(f"elapsed {time.monotonic() - _began:.0f} s")
