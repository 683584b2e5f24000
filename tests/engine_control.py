"""The vLLM engine's processes under a worker: find them, and hold the engine still, so
a test's precondition does not depend on machine speed.

Engine processes are recognised by the process titles vLLM sets
(`VLLM::EngineCore`, `VLLM::Worker`; the kernel truncates names to 15 characters,
so `VLLM::EngineCor`). Python's multiprocessing resource tracker (one per process
that ever spawned a child; it lives as long as the worker and holds no model
memory) is not an engine process.

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
MODEL_RUNNER = "VLLM::Worker"


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def is_resource_tracker(p: psutil.Process) -> bool:
    try:
        return "resource_tracker" in " ".join(p.cmdline())
    except psutil.Error:  # a zombie's command line cannot be read: not the tracker
        return False


def engine_processes(pid: int, *, unreaped: bool = False) -> list[psutil.Process]:
    """vLLM's engine processes under `pid`: running ones, and with `unreaped` also
    those that exited but their parent has not reaped (zombies), which a test of
    reaping must see. Processes gone since they were listed are left out."""
    out = []
    for p in descendants(pid):
        if is_resource_tracker(p):
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE and not unreaped:
                continue
        except psutil.NoSuchProcess:
            continue
        out.append(p)
    return out


def engine_core_of(pid: int) -> psutil.Process:
    cores = [p for p in engine_processes(pid) if p.name().startswith(ENGINE_CORE)]
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
