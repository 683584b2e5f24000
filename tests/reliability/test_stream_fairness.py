"""Two streams sent together on one connection start together, on both transports.

Issue 16: stream-2's first chunk reached the client only after stream-1 had
received 1164 chunks. Both requests are in the engine's same batch (each
engine step adds one token to each), so a transport that sends every
handler's write as it is made puts them on the wire interleaved, and every
prefix of the byte stream holds both streams level. A reader that stalls
(this test's own process, starved of CPU on a loaded machine, was measured
not calling recv() for up to 4.1 s) then gets a burst, still level. The bound
below is therefore on how far one stream is ahead of the other when the
other's first chunk arrives, in chunks, not on time: LEAD_BOUND leaves room
for one request joining the batch a few engine steps after the other, never
for a server that holds one stream back.

The client is hyper-h2 (tests/h2client.py): one connection, every frame read
and its window given back as it arrives, both streams read together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from backend.gen import backend_pb2 as pb
from tests.conftest import Worker
from tests.h2client import H2Client
from tests.reliability.helpers import greedy, load, stop_worker

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

LONG = 2000  # tokens per stream
LEAD_BOUND = 50  # chunks: see the module docstring
ROUNDS = 3


@dataclass
class Start:
    """One stream's first chunk: when, and how many chunks each stream had then."""

    after: float
    own: int
    other: int

    @property
    def lead(self) -> int:
        """How far the other stream was ahead when this one's first chunk came."""
        return self.other - self.own


@dataclass
class Round:
    starts: dict[int, Start] = field(default_factory=dict)
    totals: dict[int, int] = field(default_factory=dict)
    finals: dict[int, pb.Reply] = field(default_factory=dict)
    statuses: dict[int, tuple[int, str]] = field(default_factory=dict)


GRPCIO_BURSTS = pytest.mark.xfail(
    reason="grpc.aio (C-core) writes each stream's pending messages in one piece, one "
    "stream after the other; when a backlog forms (its writer or the reader behind on a "
    "loaded machine), a reader sees one stream ahead by the backlog: 268, 1110 and 1738 "
    "chunks measured (issue 16's pattern). Not fixed here; --transport h2 writes both "
    "streams interleaved as they are produced",
    strict=False,
)


@pytest.fixture(scope="module", params=[pytest.param("grpcio", marks=GRPCIO_BURSTS), "h2"])
def worker(request, tiny_model_dir):
    w = Worker(env={"BACKEND_TRANSPORT": request.param})
    try:
        load(w, tiny_model_dir)
        assert w.stub.Predict(greedy(Tokens=2), timeout=120).tokens == 2
        yield w
    finally:
        stop_worker(w)


def _two_streams(addr: str) -> Round:
    """Send two PredictStream calls back to back on one new connection; read both."""
    client = H2Client(addr)
    try:
        sent = time.monotonic()
        sids = [client.call("PredictStream", greedy(Tokens=LONG)) for _ in range(2)]
        streams = client.streams
        out = Round()

        def note_starts() -> bool:
            counts = {sid: len(streams[sid].messages()) for sid in sids}
            for sid, other in zip(sids, reversed(sids), strict=True):
                if sid not in out.starts and counts[sid]:
                    out.starts[sid] = Start(time.monotonic() - sent, counts[sid], counts[other])
            return len(out.starts) == 2 or any(streams[s].ended for s in sids)

        assert client.pump(note_starts, timeout=120), "the streams never started"
        assert client.pump(lambda: all(streams[s].ended for s in sids), timeout=300)
        for sid in sids:
            messages = streams[sid].messages()
            out.totals[sid] = len(messages)
            out.statuses[sid] = streams[sid].status()
            out.finals[sid] = pb.Reply.FromString(messages[-1]) if messages else pb.Reply()
        return out
    finally:
        client.close()


def test_the_second_of_two_simultaneous_streams_starts_with_the_first(worker):
    rounds = [_two_streams(worker.addr) for _ in range(ROUNDS)]
    report = [
        {
            f"stream {sid}": (
                f"first chunk after {s.after:.3f}s with {s.own} of its own, other at {s.other}"
            )
            for sid, s in r.starts.items()
        }
        | {"chunks": list(r.totals.values())}
        for r in rounds
    ]
    print("\ntwo streams on one connection:", *report, sep="\n  ")
    for r in rounds:
        # Both ran to the end normally: a stream cut short cannot hide a late start.
        assert set(r.statuses.values()) == {(0, "")}, report
        assert [f.tokens for f in r.finals.values()] == [LONG, LONG], report
        assert len(r.starts) == 2, report
        assert max(s.lead for s in r.starts.values()) <= LEAD_BOUND, report
