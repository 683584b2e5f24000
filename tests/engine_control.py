"""Hold the vLLM engine still, so a test's precondition does not depend on machine speed.

A generation the engine core cannot finish is what tests of kill, cancel and
shutdown need. Fast or slow, a core under SIGSTOP generates nothing: every
request it holds stays unfinished until SIGCONT (or SIGKILL). The worker's
front end (the gRPC server, vLLM's output handler) keeps running, so Status,
cancellation and aborts still work while the core is stopped.

The core is stopped before the requests are sent, and the worker's own log
(`--debug-requests` logs each request as it hands it to vLLM, which registers it
without the core: Engine.start asks the core's supported tasks up front) shows
they arrived. Stopping it on a stream's first output instead (what the client
reads lags by seconds, issue 16; but even the worker's "first output" line)
raced the engine on a loaded machine: the stop came after the last token. A
test that needs a generation to advance resumes the core and stops it again on
the worker's "generation finished" line of a shorter request (test_shutdown).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil

REQUEST_LOGGED = "Prompt:"  # --debug-requests: the request as it goes to vLLM
ENGINE_CORE = "VLLM::EngineCor"  # 15-character kernel name of VLLM::EngineCore


def engine_core_of(pid: int) -> psutil.Process:
    cores = [
        p
        for p in psutil.Process(pid).children(recursive=True)
        if p.is_running() and p.name().startswith(ENGINE_CORE)
    ]
    if len(cores) != 1:  # not assert: the e2e harness must hold under python -O
        raise RuntimeError(f"expected one engine core under {pid}, found {cores}")
    return cores[0]


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def stop(core: psutil.Process) -> None:
    """SIGSTOP the core and wait until the kernel reports it stopped."""
    os.kill(core.pid, signal.SIGSTOP)
    if not _wait(lambda: core.status() == psutil.STATUS_STOPPED, 10):
        raise RuntimeError(f"the engine core {core.pid} did not stop")


def resume(core: psutil.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(core.pid, signal.SIGCONT)


@contextlib.contextmanager
def stopped(core: psutil.Process) -> Iterator[psutil.Process]:
    """The core stopped for the block; resumed after it, whatever happens."""
    try:
        stop(core)
        yield core
    finally:
        resume(core)


FINISHED = "generation finished"
FIRST_OUTPUT = "first output after"


def logged(log_path: Path, correlation_ids: list[str], event: str, since: int = 0) -> set[str]:
    """Which of these requests' streams the worker logged `event` for
    (`--debug-requests`), looking at the log from byte offset `since`."""
    with open(log_path, "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    return {
        cid for cid in correlation_ids if re.search(rf"request {re.escape(cid)}-\d+: {event}", text)
    }


def wait_logged(
    log_path: Path,
    correlation_ids: list[str],
    event: str = REQUEST_LOGGED,
    since: int = 0,
    timeout: float = 120,
) -> bool:
    want = set(correlation_ids)
    return _wait(lambda: logged(log_path, correlation_ids, event, since) == want, timeout)


def read_into(call: Any, got: list) -> None:
    """Read a grpc stream into `got` until it ends or fails (run in a thread)."""
    with contextlib.suppress(grpc.RpcError):
        for reply in call:
            got.append(reply)


def quiet(got: list, seconds: float, timeout: float = 60.0) -> bool:
    """Wait until `got` has not grown for `seconds` (a held engine sends nothing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = len(got)
        time.sleep(seconds)
        if len(got) == before:
            return True
    return False
