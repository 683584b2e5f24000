"""BACKEND_IDLE_CONNECTION_S on both transports: a connection with no call open
for that long gets GOAWAY and is closed; one with a call open is kept however
long the call runs; a grpc client just reconnects for its next call.

A real worker process (no model) per transport, with a 1 s bound.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psutil
import pytest

from backend.gen import backend_pb2 as pb
from tests.conftest import Worker, retire
from tests.reliability import inbound_peer as p

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(120)]

IDLE_S = 1.0
# GOAWAY, then the close: h2grpc closes IDLE_CLOSE_GRACE (1 s) after it; plus
# scheduling slack on a loaded 2-core machine.
CLOSED_WITHIN_S = IDLE_S + 3.0
# The GOAWAY error code each transport sends. C-core's max_connection_idle
# sends INTERNAL_ERROR with "connection idle" (measured; grpc-go sends
# NO_ERROR, as h2grpc does). Clients reconnect on either.
GOAWAY_CODE = {"h2": 0, "grpcio": 2}
WATCH = "/grpc.health.v1.Health/Watch"


@pytest.fixture(scope="module", params=["grpcio", "h2"])
def transport(request) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def worker(transport: str) -> Iterator[Worker]:
    w = Worker(env={"BACKEND_TRANSPORT": transport, "BACKEND_IDLE_CONNECTION_S": str(IDLE_S)})
    try:
        yield w
    finally:
        retire(w)


def test_a_connection_without_calls_gets_goaway_and_is_closed(
    worker: Worker, transport: str
) -> None:
    peer = p.Peer(worker.addr)
    try:
        opened = time.monotonic()
        assert peer.wait(lambda: peer.goaway is not None, CLOSED_WITHIN_S), peer.reaction()
        took = time.monotonic() - opened
        assert took >= IDLE_S * 0.9, took
        assert peer.goaway is not None
        assert peer.goaway[0] == GOAWAY_CODE[transport], peer.reaction()
        assert peer.wait(lambda: peer.eof, CLOSED_WITHIN_S), peer.reaction()
    finally:
        peer.close()


def test_a_connection_with_a_call_open_is_kept_until_it_ends(worker: Worker) -> None:
    """A Health Watch stays open (its stream never ends on its own): the
    connection outlives the bound; once the call is cancelled, the clock starts."""
    peer = p.Peer(worker.addr)
    try:
        peer.send(peer.headers(1, path=WATCH) + p.frame(p.DATA, p.END_STREAM, 1, p.message(b"")))
        time.sleep(IDLE_S * 2.5)
        assert peer.goaway is None and not peer.eof, peer.reaction()
        assert 1 not in peer.ended and 1 not in peer.resets, "the Watch ended by itself"
        peer.send(p.frame(p.RST_STREAM, 0, 1, (8).to_bytes(4, "big")))
        cancelled = time.monotonic()
        assert peer.wait(lambda: peer.goaway is not None, CLOSED_WITHIN_S), peer.reaction()
        assert time.monotonic() - cancelled >= IDLE_S * 0.9
        assert peer.wait(lambda: peer.eof, CLOSED_WITHIN_S), peer.reaction()
    finally:
        peer.close()


def _served(worker: Worker) -> int:
    """Established connections the worker holds on its port."""
    port = int(worker.addr.rsplit(":", 1)[1])
    return sum(
        c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
        for c in psutil.Process(worker.proc.pid).net_connections("tcp")
    )


def test_a_grpc_client_reconnects_for_its_next_call(worker: Worker) -> None:
    assert worker.stub.Health(pb.HealthMessage(), timeout=10).message == b"OK"
    assert _served(worker) == 1  # this test's channel only
    deadline = time.monotonic() + CLOSED_WITHIN_S
    while _served(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _served(worker) == 0, "the idle connection was not closed"
    assert worker.stub.Health(pb.HealthMessage(), timeout=10).message == b"OK"
