"""Admission control and message size: overload is refused at once, never queued forever.

One worker with `--max-concurrent-requests 4 --max-message-bytes 1048576`.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from backend.gen import backend_pb2 as pb
from tests.conftest import Worker
from tests.reliability.helpers import greedy, load, rpc_code, state, stop_worker, wait_for

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

CAP = 4
MAX_MESSAGE = 1024 * 1024


@pytest.fixture(scope="module")
def capped(tiny_model_dir):
    worker = Worker(
        args=["--max-concurrent-requests", str(CAP), "--max-message-bytes", str(MAX_MESSAGE)]
    )
    try:
        load(worker, tiny_model_dir)
        yield worker
    finally:
        stop_worker(worker)


class LongStreams:
    """CAP streams that run until cancelled or finished."""

    def __init__(self, stub, tokens: int) -> None:
        # Streams add their tokens to GetMetrics when they end: any growth
        # past this (beyond the over-cap calls' own few) means one ended.
        self.generated_before = _generated(stub)
        self.calls = [stub.PredictStream(greedy(Tokens=tokens), timeout=300) for _ in range(CAP)]
        self.chunks = [0] * CAP
        self.finals: list[pb.Reply | None] = [None] * CAP
        self.errors: list[grpc.StatusCode | None] = [None] * CAP
        self.threads = [threading.Thread(target=self._read, args=(i,)) for i in range(CAP)]
        for t in self.threads:
            t.start()

    def _read(self, i: int) -> None:
        try:
            for reply in self.calls[i]:
                self.chunks[i] += 1
                self.finals[i] = reply
        except grpc.RpcError as e:
            self.errors[i] = e.code()

    def all_streaming(self, timeout: float = 120) -> bool:
        return wait_for(lambda: all(c >= 2 for c in self.chunks), timeout) is not None

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)


def _over_cap_calls(stub):
    return {
        "Predict": lambda: stub.Predict(greedy(Tokens=4), timeout=30),
        "PredictStream": lambda: list(stub.PredictStream(greedy(Tokens=4), timeout=30)),
        "chat PredictStream": lambda: list(
            stub.PredictStream(
                pb.PredictOptions(
                    UseTokenizerTemplate=True,
                    Messages=[pb.Message(role="user", content="hi")],
                    Tokens=4,
                ),
                timeout=30,
            )
        ),
    }


def _generated(stub) -> int:
    return stub.GetMetrics(pb.MetricsRequest(), timeout=10).tokens_generated


def _refusals_while_full(stub, streams: LongStreams) -> dict[str, float] | None:
    """Send each over-cap call while CAP long streams run; each must be
    refused with RESOURCE_EXHAUSTED. Returns the refusal times, or None when
    the check was inconclusive: a long stream ended on the server before or
    during it (its tokens reach GetMetrics before its slot is released), so a
    slot was legitimately free. A fast engine or a starved client (which may
    have read only 2 chunks of a stream the server already finished) can make
    that happen."""
    before = streams.generated_before
    timings: dict[str, float] = {}
    for name, call in _over_cap_calls(stub).items():
        code, details, took = rpc_code(call)
        if code != grpc.StatusCode.RESOURCE_EXHAUSTED and _generated(stub) - before > 100:
            return None
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (name, code, details)
        assert "max_concurrent_requests=4" in details, details
        # A queued request would wait for a slot, i.e. for 2000-token
        # streams; a refusal is one round trip (slack for a busy CPU).
        assert took < 3.0, f"{name} took {took:.2f}s to be refused"
        timings[name] = took
    return timings


def test_requests_over_the_cap_are_refused_quickly_and_accepted_after(capped):
    # ~2000 tokens (the context) take the tiny model seconds with 4 in a batch.
    timings = None
    for _attempt in range(3):
        streams = LongStreams(capped.stub, tokens=2000)
        try:
            assert streams.all_streaming(), f"streams never started: {streams.errors}"
            timings = _refusals_while_full(capped.stub, streams)
            if timings is not None:
                # Tokenizer and lifecycle RPCs are not generation and stay available.
                assert capped.stub.TokenizeString(pb.PredictOptions(Prompt="hi"), timeout=5).tokens
                assert capped.stub.Health(pb.HealthMessage(), timeout=5).message == b"OK"
            streams.join(300)
        finally:
            for call in streams.calls:
                call.cancel()
        assert streams.errors == [None] * CAP, "the admitted streams were not disturbed"
        assert all(f is not None and f.tokens == 2000 for f in streams.finals)
        if timings is not None:
            break
    assert timings is not None, "a long stream ended during every check: the engine is too fast"
    print(f"\nrefusals over the cap: { {k: round(v, 3) for k, v in timings.items()} }")
    # Finished requests give their slots back: CAP new ones run side by side.
    results: list[int] = []

    def one() -> None:
        results.append(capped.stub.Predict(greedy(Tokens=3), timeout=120).tokens)

    threads = [threading.Thread(target=one) for _ in range(CAP)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert results == [3] * CAP


def test_cancelled_and_refused_requests_give_their_slots_back(capped):
    conclusive = 0
    for _ in range(6):
        streams = LongStreams(capped.stub, tokens=2000)
        assert streams.all_streaming()
        if _refusals_while_full(capped.stub, streams) is not None:
            conclusive += 1
        for call in streams.calls:
            call.cancel()
        streams.join(60)
        # A stream that ended on the server before the cancel reached it ends
        # normally on the client; every other one is CANCELLED.
        assert all(
            e == grpc.StatusCode.CANCELLED or (e is None and f is not None and f.tokens == 2000)
            for e, f in zip(streams.errors, streams.finals, strict=True)
        ), streams.errors
        if conclusive == 3:
            break
    assert conclusive >= 3, f"only {conclusive} conclusive checks: long streams kept ending early"
    # Slots are released when the handler ends, which follows the cancel closely.
    assert wait_for(lambda: state(capped) == pb.StatusResponse.READY, 10) is not None
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(capped.stub.Predict(greedy(Tokens=3), timeout=120).tokens)
        )
        for _ in range(CAP)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert results == [3] * CAP


def test_message_over_the_size_limit_is_resource_exhausted_and_the_worker_serves(capped):
    huge = "x" * (2 * MAX_MESSAGE)
    for name, call in {
        "Predict": lambda: capped.stub.Predict(pb.PredictOptions(Prompt=huge), timeout=30),
        "PredictStream": lambda: list(
            capped.stub.PredictStream(pb.PredictOptions(Prompt=huge), timeout=30)
        ),
        "TokenizeString": lambda: capped.stub.TokenizeString(
            pb.PredictOptions(Prompt=huge), timeout=30
        ),
    }.items():
        code, details, took = rpc_code(call)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (name, code, details)
        assert took < 5.0
    started = time.monotonic()
    assert capped.stub.Predict(greedy(Tokens=4), timeout=60).tokens == 4
    assert time.monotonic() - started < 30
    # Just under the limit is accepted by gRPC (and then judged by the model:
    # far longer than the context, so INVALID_ARGUMENT, not a transport error).
    just_under = pb.PredictOptions(Prompt="x" * (MAX_MESSAGE - 1024))
    code, details, _ = rpc_code(lambda: capped.stub.Predict(just_under, timeout=120))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
