"""A request cut short by Free or a replacing LoadModel says so.

vLLM ends every request still running when its engine stops with finish_reason
"abort"; before this was read, such a stream ended OK with a final Reply and
usage after a few tokens, and the gateway stored a truncated answer as complete.
Now a cut request — streaming or unary — ends UNAVAILABLE with the reason, and
never sends a final (usage) Reply. (Shutdown after the grace period:
test_shutdown.py.)

The precondition is created, not raced: the engine core is SIGSTOPped once the
worker has handed the requests to vLLM (its `--debug-requests` log line), so
none can finish whatever the machine's speed; the test checks that (no call
ended, Status BUSY) before the cut, and lets the core run again only once the
calls have ended — which also shows the cut does not wait for the core.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import pytest

from backend.gen import backend_pb2 as pb
from tests import engine_control
from tests.conftest import Worker, retire, tiny_load_options
from tests.reliability.helpers import describe, greedy, load, state, state_name, survivors

pytestmark = [pytest.mark.reliability]

LONG = 2000  # tokens: held unfinished by the stopped core


@dataclass
class Call:
    """One PredictStream or Predict run in a thread; what it got and how it ended."""

    name: str
    stream: bool
    tokens: int = LONG
    replies: list[pb.Reply] = field(default_factory=list)
    code: grpc.StatusCode | None = None
    details: str = ""
    done: threading.Event = field(default_factory=threading.Event)

    def run(self, stub) -> None:
        request = greedy(Tokens=self.tokens, CorrelationId=self.name)
        try:
            if self.stream:
                for reply in stub.PredictStream(request, timeout=600):
                    self.replies.append(reply)
            else:
                self.replies.append(stub.Predict(request, timeout=600))
        except grpc.RpcError as e:
            self.code, self.details = e.code(), e.details() or ""
        finally:
            self.done.set()

    def start(self, stub) -> Call:
        threading.Thread(target=self.run, args=(stub,), daemon=True).start()
        return self

    def describe(self) -> str:
        usage = [r.tokens for r in self.replies if r.tokens]
        return (
            f"{self.name}: {self.code} {self.details!r}, {len(self.replies)} replies, "
            f"usage tokens {usage}"
        )


def _held(worker: Worker, calls: list[Call]) -> str:
    """Send the calls with the engine core stopped; return the checked precondition."""
    since = worker.log_path.stat().st_size
    for call in calls:
        call.start(worker.stub)
    names = [c.name for c in calls]
    assert engine_control.wait_logged(worker.log_path, names, since=since, timeout=120), (
        worker.log_tail()
    )
    busy = state(worker)
    precondition = f"core stopped, requests in vLLM, Status {state_name(busy)}"
    assert busy == pb.StatusResponse.BUSY, precondition
    for call in calls:
        assert not call.done.is_set(), f"ended before the cut: {call.describe()}"
    return precondition


def _assert_cut(call: Call, reason: str) -> None:
    assert call.done.wait(60), f"never ended: {call.describe()}"
    assert call.code == grpc.StatusCode.UNAVAILABLE, call.describe()
    assert reason in call.details and "incomplete" in call.details, call.describe()
    # No reply that looks complete: no usage on anything received.
    assert all(r.tokens == 0 and r.prompt_tokens == 0 for r in call.replies), call.describe()


def _cut_by(worker: Worker, action: Callable[[], object], reason: str) -> object:
    """A stream and a unary call held in the engine, then `action` (Free or
    LoadModel, in a thread): both end UNAVAILABLE with `reason` while the core
    is still stopped; then the core runs again and `action` completes, with
    what it returned."""
    core = engine_control.engine_core_of(worker.proc.pid)
    calls = [Call("cut-stream", stream=True), Call("cut-unary", stream=False)]
    outcome: list[object] = []
    with engine_control.stopped(core):
        _held(worker, calls)
        acting = threading.Thread(target=lambda: outcome.append(action()), daemon=True)
        acting.start()
        for call in calls:
            _assert_cut(call, reason)
    acting.join(300)
    assert outcome, "Free/LoadModel did not return"
    return outcome[0]


@pytest.fixture
def worker(tiny_loaded):
    """A pooled worker with the tiny model loaded (default options), which the
    replacing test replaces with `REPLACED` options."""
    return tiny_loaded


REPLACED = {"MaxModelLen": 1024}


@pytest.fixture
def replaced(workers, tiny_model_dir):
    """A pooled worker with the tiny model loaded with `REPLACED` options: the
    state the replacing test leaves, so the Free test (after it in this module)
    needs no engine start of its own; run alone or first, it gets one."""
    with workers.use(load=tiny_load_options(tiny_model_dir, **REPLACED)) as w:
        yield w


def test_replacing_load_cuts_running_requests_with_unavailable(worker, tiny_model_dir):
    old = engine_control.engine_processes(worker.proc.pid)
    replace = lambda: load(worker, tiny_model_dir, **REPLACED)  # noqa: E731
    result = _cut_by(worker, replace, "replaced (LoadModel)")
    assert "max_model_len 1024" in result.message, result.message  # the new options
    # The old engine is gone, a new one serves, and a request that runs to its
    # end is complete.
    left = survivors(old, timeout=30)
    assert old and not left, f"old engine processes still running: {describe(left)}"
    assert engine_control.engine_processes(worker.proc.pid)
    assert worker.stub.Predict(greedy(Tokens=5), timeout=120).tokens == 5


def test_free_cuts_running_stream_and_unary_with_unavailable(replaced):
    free = lambda: replaced.stub.Free(pb.HealthMessage(), timeout=300)  # noqa: E731
    _cut_by(replaced, free, "unloaded (Free)")
    assert state(replaced) == pb.StatusResponse.UNINITIALIZED


def test_drain_lets_short_requests_finish_and_cuts_the_rest(tiny_model_dir):
    """BACKEND_DRAIN_SECONDS: Free waits that long for running requests; one
    that ends within it completes normally, one that cannot is cut after it.

    Both are sent with the core stopped; after Free starts draining, the core
    runs until the worker logs the short generation's end (8 tokens), then is
    stopped again. The long one cannot finish within the drain period even if
    the core is stopped late: at full speed its 2,000 tokens take ~3 s here
    (2,000 steps of ~1.5 ms), three times the drain. (With a drain of 3 s, a
    CI run stopped the core only after the long one had finished: the process
    that stops it waited seconds to be scheduled while the engine ran.)"""
    drain = 1.0
    w = Worker(env={"BACKEND_DRAIN_SECONDS": str(drain)}, args=["--debug-requests"])
    try:
        load(w, tiny_model_dir)
        core = engine_control.engine_core_of(w.proc.pid)
        long, short = Call("drain-long", stream=True), Call("drain-short", stream=True, tokens=8)
        since = w.log_path.stat().st_size
        outcome: list[pb.Result] = []
        with engine_control.stopped(core):
            _held(w, [long, short])
            freeing = threading.Thread(
                target=lambda: outcome.append(w.stub.Free(pb.HealthMessage(), timeout=300)),
                daemon=True,
            )
            freeing.start()
            engine_control.resume(core)
            assert engine_control.wait_logged(
                w.log_path, ["drain-short"], engine_control.FINISHED, since, 60
            ), w.log_tail()
            engine_control.stop(core)
            assert short.done.wait(60) and short.code is None, short.describe()
            assert short.replies[-1].tokens == 8, short.describe()
            _assert_cut(long, "unloaded (Free)")
        freeing.join(300)
        assert outcome and outcome[0].success
    finally:
        retire(w)
