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
import threading
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


def _fail_unless(cond: Any, message: str) -> None:
    # Not `assert`: the e2e harness runs this under python -O too.
    if not cond:
        raise AssertionError(message)


def cancel_aborts_engine_request(
    stub: Any,
    core: psutil.Process,
    request: Any,
    *,
    log_path: Path | None,
    ready_within: float = 2.0,
) -> str:
    """Cancel a stream the engine provably has not finished: the worker must abort it
    in vLLM, so Status (vLLM's table of unfinished requests) goes back to READY.

    The engine core is SIGSTOPped before `request` (a PredictOptions with a
    CorrelationId, long enough not to finish) is streamed, so the generation cannot
    end however fast the machine is; `log_path` (the worker's log, when it runs with
    --debug-requests) shows the request reached vLLM, which registers it without the
    core. Checked before the cancel: nothing arrives for 1 s, the call has no status,
    Status is BUSY. READY within `ready_within` seconds with the core still stopped
    can then only come from the worker aborting the request: one that was not aborted
    stays in the table while the core is stopped. (Stopping the core on the stream's
    first output instead raced the engine: on a loaded machine the stop came after
    the last token.) Used by the integration test (the worker as tests start it) and
    the e2e harness (the packaged worker, maybe one it did not start).

    Returns what was seen, for the caller to print; raises AssertionError if the proof
    fails. The core is resumed whatever happens.
    """
    from backend.gen import backend_pb2 as pb

    def status() -> int:
        return int(stub.Status(pb.HealthMessage(), timeout=10).state)

    since = log_path.stat().st_size if log_path is not None else 0
    got: list[Any] = []
    reader = None
    try:
        stop(core)
        call = stub.PredictStream(request, timeout=300)
        if log_path is not None:
            _fail_unless(
                wait_logged(log_path, [request.CorrelationId], since=since),
                "the worker never logged the request",
            )
        reader = threading.Thread(target=read_into, args=(call, got), daemon=True)
        reader.start()
        _fail_unless(quiet(got, 1.0), "chunks kept coming with the engine core stopped")
        busy = status()
        precondition = (
            f"engine core stopped before the stream was sent; call done: {call.done()}, "
            f"Status {pb.StatusResponse.State.Name(busy)}"
        )
        _fail_unless(not call.done(), f"the call ended with the core stopped ({precondition})")
        _fail_unless(busy == pb.StatusResponse.BUSY, f"not BUSY during generation: {precondition}")
        call.cancel()
        cancelled_at = time.monotonic()
        state = busy
        while time.monotonic() - cancelled_at < ready_within:
            state = status()
            if state == pb.StatusResponse.READY:
                break
            time.sleep(0.02)
        ready_ms = (time.monotonic() - cancelled_at) * 1000
        _fail_unless(
            state == pb.StatusResponse.READY,
            f"Status still {pb.StatusResponse.State.Name(state)} {ready_within}s after "
            f"cancel with the engine core stopped ({precondition})",
        )
        _fail_unless(core.status() == psutil.STATUS_STOPPED, "the engine core ran during the check")
    finally:
        resume(core)
        if reader is not None:
            reader.join(10)
    _fail_unless(call.code() == grpc.StatusCode.CANCELLED, f"call ended with {call.code()}")
    return f"{precondition}; READY {ready_ms:.0f} ms after cancel"
