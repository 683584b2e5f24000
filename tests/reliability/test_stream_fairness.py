"""Two streams sent together on one connection start together, on both transports.

Issue 16: stream-2's first chunk reached the client only after stream-1 had
received 1164 chunks. Measured since: the client's view is not the server's.
This test's own process, starved of CPU on a loaded machine, was seen not
calling recv() for up to 7 s and then got a burst in which one stream's
backlog was ahead of the other's (grpc.aio writes a stream's pending messages
in one piece; h2 flushes per-stream backlogs in order once the window opens).
So fairness is judged where it is decided: in the worker's own log
(`--debug-requests`), both streams must get their first output before either
finishes — true when both requests share the engine's batch (each engine step
adds one token to each), false when one is held back behind the other. The
client's chunk counts at each first chunk are printed, not asserted.

The client is hyper-h2 (tests/h2client.py): one connection, every frame read
and its window given back as it arrives, both streams read together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backend.gen import backend_pb2 as pb
from tests.conftest import Worker
from tests.h2client import H2Client
from tests.reliability.helpers import greedy, load, stop_worker

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

LONG = 2000  # tokens per stream
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


# Open (issue 16): measured 2026-12-02 on both transports, 1-2 rounds of 3, also
# with nothing else running: the worker logged the second request only after the
# first had finished (log: a Prompt, a first output, a finished, then b Prompt),
# while this client had read nothing for 6-7 s. The second request reaches the
# handler late; suspected: the transport stops reading a connection whose
# replies back up (h2grpc does so on purpose, a hardening of issue 11; C-core's
# flow control may do the same), so a request sent just after the first waits
# behind that stream's backlog. Not fixed yet: xfail, not strict, so a round
# that shows it is reported (XFAIL) and one that does not passes.
HELD_BEHIND = pytest.mark.xfail(
    reason="the second request can reach the worker only after the first stream's "
    "backlog drains (see the comment above: issue 16, open)",
    strict=False,
)


@pytest.fixture(scope="module", params=["grpcio", "h2"])
def worker(request, tiny_model_dir):
    # --debug-requests: the worker logs each stream's first output and end.
    w = Worker(env={"BACKEND_TRANSPORT": request.param}, args=["--debug-requests"])
    try:
        load(w, tiny_model_dir)
        assert w.stub.Predict(greedy(Tokens=2), timeout=120).tokens == 2
        yield w
    finally:
        stop_worker(w)


def _served_together(log_path: Path, since: int, names: list[str]) -> tuple[bool, str]:
    """In the worker's own log: did every stream get its first output before any
    of them finished? (Both in one engine batch: each step adds a token to each.)"""
    with open(log_path, "rb") as f:
        f.seek(since)
        lines = f.read().decode(errors="replace").splitlines()
    firsts, ends = [], []
    for i, line in enumerate(lines):
        for name in names:
            if f"request {name}-" in line and "first output after" in line:
                firsts.append(i)
            if f"request {name}-" in line and "generation finished" in line:
                ends.append(i)
    seen = f"first outputs at log lines {firsts}, ends at {ends}"
    return len(firsts) == len(names) == len(ends) and max(firsts) < min(ends), seen


def _two_streams(addr: str, names: list[str]) -> Round:
    """Send two PredictStream calls back to back on one new connection; read both."""
    client = H2Client(addr)
    try:
        sent = time.monotonic()
        sids = [client.call("PredictStream", greedy(Tokens=LONG, CorrelationId=n)) for n in names]
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


@HELD_BEHIND
def test_the_second_of_two_simultaneous_streams_starts_with_the_first(worker):
    """Judged in the worker's own log, not by what the client read: the client's
    view is also printed (when the reader stalls on a loaded machine, a burst
    can hold one stream's backlog ahead of the other's on either transport —
    grpc.aio writes a stream's pending messages in one piece — which says
    nothing about when the server started them)."""
    rounds, served = [], []
    for i in range(ROUNDS):
        since = worker.log_path.stat().st_size
        names = [f"fair{i}-a", f"fair{i}-b"]
        rounds.append(_two_streams(worker.addr, names))
        served.append(_served_together(worker.log_path, since, names))
    report = [
        {
            f"stream {sid}": (
                f"first chunk after {s.after:.3f}s with {s.own} of its own, other at {s.other}"
            )
            for sid, s in r.starts.items()
        }
        | {"chunks": list(r.totals.values()), "worker log": seen}
        for r, (_, seen) in zip(rounds, served, strict=True)
    ]
    print("\ntwo streams on one connection:", *report, sep="\n  ")
    for r, (together, _) in zip(rounds, served, strict=True):
        # Both ran to the end normally: a stream cut short cannot hide a late start.
        assert set(r.statuses.values()) == {(0, "")}, report
        assert [f.tokens for f in r.finals.values()] == [LONG, LONG], report
        assert len(r.starts) == 2, report
        assert together, report
