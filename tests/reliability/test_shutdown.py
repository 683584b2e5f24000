"""Shutdown paths: SIGTERM / SIGINT with a stream in flight, and the gateway dying.

Every path must end with no engine process left: an orphaned engine keeps
its KV cache (gigabytes on a real model) until someone notices.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc
import psutil
import pytest

from backend.gen import backend_pb2 as pb
from backend.gen import backend_pb2_grpc
from tests import engine_control
from tests.conftest import ROOT, Worker, free_port, kill_group, tiny_load_options
from tests.reliability.helpers import (
    describe,
    greedy,
    load,
    log_text,
    running,
    state,
    state_name,
    survivors,
    wait_for,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

# BACKEND_GRACE_SECONDS (default 10); short, so the test is.
GRACE = 2.0
# After the grace period: cancel the rest, stop the engine (vLLM waits up to
# 5 s for its worker process), then interpreter exit (~1-10 s of garbage
# collection over torch/vLLM on this loaded 2-core machine).
EXIT_MARGIN = 25.0
SHORT, LONG = 40, 2000  # tokens


@dataclass
class Stream:
    name: str
    tokens: int
    chunks: int = 0
    final: pb.Reply | None = None
    code: grpc.StatusCode | None = None
    details: str = ""
    ended_at: float = 0.0
    ended: threading.Event = field(default_factory=threading.Event)

    def run(self, stub) -> None:
        request = greedy(Tokens=self.tokens, CorrelationId=self.name)
        try:
            for reply in stub.PredictStream(request, timeout=300):
                self.chunks += 1
                self.final = reply
        except grpc.RpcError as e:
            self.code, self.details = e.code(), e.details() or ""
        finally:
            self.ended_at = time.monotonic()
            self.ended.set()


@dataclass
class Signalled:
    sig: signal.Signals
    worker: Worker
    short: Stream
    long: Stream
    sent_at: float
    exited_at: float | None
    returncode: int | None
    after_signal: tuple[grpc.StatusCode | None, str]
    engine_procs: list[psutil.Process]
    precondition: str


@pytest.fixture(
    scope="module",
    # SIGINT takes the same path as SIGTERM (what a gateway sends): make test-all.
    params=[signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.long)],
    ids=lambda s: s.name,
)
def signalled(request, tiny_model_dir):
    """A loaded worker signalled while a short and a long stream are running.

    The conditions are created, not raced against the machine's speed:
      * both streams are in flight at the signal and neither can have ended:
        the engine core is SIGSTOPped before they are sent; checked: the
        worker logged both requests (they are in vLLM's hands), neither call
        has ended, Status BUSY;
      * the short one can finish in the grace period: the core is resumed
        right after the signal and the short stream needs SHORT tokens;
      * the long one cannot: when the worker logs the short generation's
        end, the core is stopped again, the long request then at about as
        many tokens (same batch) of its LONG; it stays stopped until the long
        call has ended, so only the end of the grace period can end it.
    The core then runs again, so the worker's engine stop is the normal one.
    """
    sig = request.param
    worker = Worker(env={"BACKEND_GRACE_SECONDS": str(GRACE)}, args=["--debug-requests"])
    core = None
    try:
        load(worker, tiny_model_dir)
        procs = engine_control.engine_processes(worker.proc.pid)
        core = engine_control.engine_core_of(worker.proc.pid)
        since = worker.log_path.stat().st_size
        engine_control.stop(core)
        short, long = Stream("short", SHORT), Stream("long", LONG)
        threads = [threading.Thread(target=s.run, args=(worker.stub,)) for s in (long, short)]
        for t in threads:
            t.start()
        # --debug-requests logs each request (its text: `Prompt: ...`) as it goes to vLLM.
        assert engine_control.wait_logged(
            worker.log_path, ["long", "short"], since=since, timeout=60
        ), worker.log_tail()
        busy = state(worker)
        precondition = (
            f"at the signal: engine core stopped since before the calls, Status "
            f"{state_name(busy)}, chunks read: long {long.chunks}, short {short.chunks}"
        )
        assert not long.ended.is_set() and not short.ended.is_set(), precondition
        assert busy == pb.StatusResponse.BUSY, precondition
        sent_at = time.monotonic()
        os.kill(worker.proc.pid, sig)
        engine_control.resume(core)
        assert engine_control.wait_logged(
            worker.log_path, ["short"], engine_control.FINISHED, since, timeout=GRACE + 30
        ), worker.log_tail()
        engine_control.stop(core)
        precondition += (
            f"; short generated, engine stopped again after {time.monotonic() - sent_at:.2f}s"
        )
        try:
            worker.stub.Predict(greedy(Tokens=2), timeout=10)
            after: tuple[grpc.StatusCode | None, str] = (None, "")
        except grpc.RpcError as e:
            after = (e.code(), e.details() or "")
        long.ended.wait(GRACE + 60)
        engine_control.resume(core)
        try:
            worker.proc.wait(GRACE + EXIT_MARGIN + 30)
            exited_at: float | None = time.monotonic()
        except subprocess.TimeoutExpired:
            exited_at = None
        for t in threads:
            t.join(60)
        yield Signalled(
            sig,
            worker,
            short,
            long,
            sent_at,
            exited_at,
            worker.proc.returncode,
            after,
            procs,
            precondition,
        )
    finally:
        if core is not None:
            engine_control.resume(core)
        worker.stop()
        kill_group(worker.proc.pid)


def _report(s: Signalled) -> str:
    exit_after = f"{s.exited_at - s.sent_at:.1f}s" if s.exited_at else "never"
    return (
        f"{s.sig.name}: exit {s.returncode} after {exit_after}; "
        f"short stream: {'final reply' if s.short.code is None else s.short.code} "
        f"({s.short.chunks} chunks); long stream: {s.long.code} {s.long.details!r} after "
        f"{s.long.ended_at - s.sent_at:.1f}s ({s.long.chunks} chunks); "
        f"new Predict after the signal: {s.after_signal[0]} {s.after_signal[1]!r}; "
        f"{s.precondition}"
    )


def test_worker_exits_within_grace_plus_margin(signalled):
    print("\n" + _report(signalled))
    assert signalled.exited_at is not None, f"never exited:\n{signalled.worker.log_tail()}"
    took = signalled.exited_at - signalled.sent_at
    assert took < GRACE + EXIT_MARGIN, _report(signalled)
    assert "shutting down" in log_text(signalled.worker)


def test_a_stream_that_fits_in_the_grace_period_completes(signalled):
    short = signalled.short
    assert short.code is None, _report(signalled)
    assert short.final is not None and short.final.tokens == SHORT, _report(signalled)


def test_a_stream_cut_by_shutdown_ends_unavailable(signalled):
    """UNAVAILABLE with the reason when the grace period ends: the gateway may
    retry elsewhere; CANCELLED would look like its own cancel, and a stream
    that just stops (or ends with a final reply) would look complete."""
    long = signalled.long
    assert long.code == grpc.StatusCode.UNAVAILABLE, _report(signalled)
    assert "shutting down" in long.details and "incomplete" in long.details, _report(signalled)
    assert long.ended_at - signalled.sent_at < GRACE + 5.0, _report(signalled)
    assert long.final is None or long.final.tokens == 0, "no final (usage) reply on a cut stream"


def test_new_requests_after_the_signal_are_refused(signalled):
    code, _ = signalled.after_signal
    assert code == grpc.StatusCode.UNAVAILABLE, _report(signalled)


def test_no_engine_process_outlives_the_worker(signalled):
    assert signalled.engine_procs
    left = survivors(signalled.engine_procs, timeout=10)
    assert not left, f"orphaned engine processes: {describe(left)}"


# ---- the gateway (our parent) dies ----------------------------------------------------

PARENT = """
import subprocess, sys, time
log = open(sys.argv[2], "wb")
child = subprocess.Popen(
    [sys.executable, "-m", "backend", "--addr", sys.argv[1]],
    stdout=log, stderr=subprocess.STDOUT,
)
print(child.pid, flush=True)
time.sleep(3600)
"""


@dataclass
class Family:
    parent: subprocess.Popen
    worker: psutil.Process
    stub: backend_pb2_grpc.BackendStub
    channel: grpc.Channel
    log_path: str


def _start_family(tmp_path, env: dict[str, str]) -> Family:
    addr = f"127.0.0.1:{free_port()}"
    log_path = str(tmp_path / "worker.log")
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, addr, log_path],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # one process group: parent, worker, engine
    )
    worker = psutil.Process(int(parent.stdout.readline()))
    channel = grpc.insecure_channel(addr)
    stub = backend_pb2_grpc.BackendStub(channel)

    def healthy() -> bool:
        try:
            return stub.Health(pb.HealthMessage(), timeout=2).message == b"OK"
        except grpc.RpcError:
            return False

    family = Family(parent, worker, stub, channel, log_path)
    if wait_for(healthy, 120, interval=0.3) is None:
        _cleanup(family)
        pytest.fail(f"worker never healthy: {_tail(log_path)}")
    return family


def _tail(path: str, n: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def _cleanup(family: Family) -> None:
    family.channel.close()
    if running(family.worker):
        family.worker.terminate()
        survivors([family.worker], 30)
    kill_group(family.parent.pid)
    family.parent.wait(10)


def test_worker_and_engine_exit_when_the_parent_is_killed(tmp_path, tiny_model_dir):
    family = _start_family(tmp_path, {"LOCALAI_BACKEND_PARENT_WATCH_INTERVAL": "0.5"})
    try:
        result = family.stub.LoadModel(tiny_load_options(tiny_model_dir), timeout=600)
        assert result.success, result.message
        engine = engine_control.engine_processes(family.worker.pid)
        assert engine, "the model runs in engine processes under the worker"
        family.parent.kill()
        family.parent.wait(10)
        gone = wait_for(lambda: not running(family.worker), 60, interval=0.1)
        left = survivors(engine, timeout=15)
        log = _tail(family.log_path, 100_000)
        print(f"\nparent killed: worker gone after {gone}s, engine left: {describe(left)}")
        assert gone is not None, f"worker still running 60 s after its parent died:\n{log[-3000:]}"
        assert "parent process" in log
        # 0.5 s to notice, the engine stop (vLLM waits up to 5 s for its
        # worker process), interpreter exit on a loaded machine.
        assert gone < 25.0, f"worker took {gone:.1f}s to exit"
        assert not left, f"engine processes orphaned: {describe(left)}"
    finally:
        _cleanup(family)


def test_parent_watch_off_keeps_the_worker_running(tmp_path):
    family = _start_family(
        tmp_path,
        {"LOCALAI_BACKEND_PARENT_WATCH": "0", "LOCALAI_BACKEND_PARENT_WATCH_INTERVAL": "0.2"},
    )
    try:
        family.parent.kill()
        family.parent.wait(10)
        time.sleep(3.0)  # 15 watch intervals
        assert running(family.worker), _tail(family.log_path)
        assert family.stub.Health(pb.HealthMessage(), timeout=10).message == b"OK"
        assert family.worker.ppid() != family.parent.pid, "the worker was re-parented"
    finally:
        _cleanup(family)
    assert not running(family.worker)
    assert not [p for p in engine_control.descendants(family.worker.pid) if running(p)]
