"""A request cut short by Free, a replacing LoadModel or shutdown says so.

vLLM ends every request still running when its engine stops with
finish_reason "abort"; before this was read, such a stream ended OK with a final
Reply and usage after a few tokens, and the gateway stored a truncated answer
as complete. Now a cut request — streaming or unary — ends UNAVAILABLE with the
reason, and never sends a final (usage) Reply.

Precondition, created and checked rather than hoped for: the long requests ask
for 4000 tokens with IgnoreEOS (MaxModelLen 4096), i.e. 4000 engine steps, and
the cut is sent as soon as the stream's first chunk has arrived and Status says
BUSY; the test then checks that the stream had not ended before the cut.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest

from backend.gen import backend_pb2 as pb
from tests.conftest import Worker, tiny_load_options
from tests.reliability.helpers import greedy

pytestmark = [pytest.mark.reliability]

LONG = 4000  # tokens: cannot finish between the first chunk and the cut
MAX_LEN = 4096


def _load(worker: Worker, model_dir) -> None:
    result = worker.stub.LoadModel(tiny_load_options(model_dir, MaxModelLen=MAX_LEN), timeout=600)
    assert result.success, f"{result.message}\n{worker.log_tail()}"


@dataclass
class Call:
    """One PredictStream or Predict run in a thread; what it got and how it ended."""

    stream: bool
    tokens: int
    replies: list[pb.Reply] = field(default_factory=list)
    code: grpc.StatusCode | None = None
    details: str = ""
    first: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self, stub) -> None:
        request = greedy(Tokens=self.tokens)
        try:
            if self.stream:
                for reply in stub.PredictStream(request, timeout=600):
                    self.replies.append(reply)
                    self.first.set()
            else:
                self.replies.append(stub.Predict(request, timeout=600))
        except grpc.RpcError as e:
            self.code, self.details = e.code(), e.details() or ""
        finally:
            self.first.set()
            self.done.set()

    def start(self, stub) -> Call:
        threading.Thread(target=self.run, args=(stub,), daemon=True).start()
        return self

    def describe(self) -> str:
        usage = [r.tokens for r in self.replies if r.tokens]
        return (
            f"{'stream' if self.stream else 'unary'}: {self.code} {self.details!r}, "
            f"{len(self.replies)} replies, usage tokens {usage}"
        )


def _running(worker: Worker, *calls: Call) -> None:
    """The precondition of every cut: the calls are in the engine and unfinished."""
    for call in calls:
        assert call.first.wait(300) if call.stream else True
    deadline = time.monotonic() + 60
    while worker.stub.Status(pb.HealthMessage()).state != pb.StatusResponse.BUSY:
        assert time.monotonic() < deadline, "the requests never showed as running"
        time.sleep(0.01)
    for call in calls:
        assert not call.done.is_set(), f"ended before the cut: {call.describe()}"


def _assert_cut(call: Call, reason: str) -> None:
    assert call.done.wait(120), f"never ended: {call.describe()}"
    assert call.code == grpc.StatusCode.UNAVAILABLE, call.describe()
    assert reason in call.details, call.describe()
    assert "incomplete" in call.details, call.describe()
    # No reply that looks complete: no usage on anything received.
    assert all(r.tokens == 0 and r.prompt_tokens == 0 for r in call.replies), call.describe()


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    w = Worker()
    yield w
    w.stop()


def test_free_cuts_running_stream_and_unary_with_unavailable(worker, tiny_model_dir):
    _load(worker, tiny_model_dir)
    stream = Call(stream=True, tokens=LONG).start(worker.stub)
    unary = Call(stream=False, tokens=LONG).start(worker.stub)
    _running(worker, stream, unary)
    assert worker.stub.Free(pb.HealthMessage(), timeout=120).success
    _assert_cut(stream, "unloaded (Free)")
    _assert_cut(unary, "unloaded (Free)")
    assert len(stream.replies) < LONG


def test_replacing_load_cuts_running_requests_with_unavailable(worker, tiny_model_dir):
    _load(worker, tiny_model_dir)
    stream = Call(stream=True, tokens=LONG).start(worker.stub)
    unary = Call(stream=False, tokens=LONG).start(worker.stub)
    _running(worker, stream, unary)
    _load(worker, tiny_model_dir)  # the replacement
    _assert_cut(stream, "replaced (LoadModel)")
    _assert_cut(unary, "replaced (LoadModel)")
    # The new model serves, and a request that runs to its end is complete.
    reply = worker.stub.Predict(greedy(Tokens=5), timeout=120)
    assert reply.tokens == 5


def test_drain_lets_short_requests_finish_and_cuts_the_rest(tiny_model_dir):
    """BACKEND_DRAIN_SECONDS: Free waits that long for running requests; one
    that ends within it completes normally, one that cannot is cut after it."""
    drain = 3.0
    w = Worker(env={"BACKEND_DRAIN_SECONDS": str(drain)})
    try:
        _load(w, tiny_model_dir)
        long = Call(stream=True, tokens=LONG).start(w.stub)
        # 8 tokens: a few engine steps, far inside the drain period.
        short = Call(stream=True, tokens=8).start(w.stub)
        assert short.first.wait(300), short.describe()  # admitted: it has streamed
        _running(w, long)
        sent = time.monotonic()
        assert w.stub.Free(pb.HealthMessage(), timeout=120).success
        freed_after = time.monotonic() - sent
        assert short.done.wait(60) and short.code is None, short.describe()
        assert short.replies[-1].tokens == 8, short.describe()
        _assert_cut(long, "unloaded (Free)")
        assert freed_after >= drain, f"Free returned after {freed_after:.1f}s, drain {drain}s"
    finally:
        w.stop()
