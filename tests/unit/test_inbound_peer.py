"""The raw HTTP/2 peer of tests/reliability/test_inbound.py waits for a server
that is still talking, however slowly its own reader parses.

A flood of 5.7 million SETTINGS frames once made grpcio owe as many ACKs; the
peer's reader needed more than the fixed 10 s to parse them before the
answer behind them, and the test failed in CI. `wait_while_talking` gives up
only after a silence. Here a local socket plays the server and the peer's
frame parsing is slowed on purpose, so the answer comes after the time a
fixed wait would have allowed.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.reliability import inbound_peer as p

pytestmark = pytest.mark.timeout(60)

ACKS = 20_000
SLOW_PER_FRAME = 100e-6  # 20 000 frames: at least 2 s of parsing


@pytest.fixture
def server() -> Iterator[tuple[str, threading.Event]]:
    """Sends ACKS SETTINGS ACKs, then a GOAWAY; then stays silent until told to close."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        conn.sendall(p.frame(p.SETTINGS, p.ACK, 0) * ACKS + p.frame(p.GOAWAY, 0, 0, bytes(8)))
        done.wait(30)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"127.0.0.1:{listener.getsockname()[1]}", done
    done.set()
    listener.close()


@pytest.fixture
def slow_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    original = p.Peer._frame

    def slow(self, *args) -> None:
        end = time.perf_counter() + SLOW_PER_FRAME
        while time.perf_counter() < end:
            pass
        original(self, *args)

    monkeypatch.setattr(p.Peer, "_frame", slow)


def test_waits_past_a_fixed_window_while_frames_keep_arriving(server, slow_parsing) -> None:
    addr, _ = server
    peer = p.Peer(addr)
    started = time.monotonic()
    # A silence of 0.5 s is far shorter than the parsing: the wait must not end on time.
    assert peer.wait_while_talking(lambda: peer.goaway is not None, silence=0.5)
    took = time.monotonic() - started
    assert peer.frames_in >= ACKS
    assert took >= ACKS * SLOW_PER_FRAME  # the precondition: it outlasted `silence` many times
    peer.close()


def test_gives_up_after_the_silence(server) -> None:
    addr, _ = server
    peer = p.Peer(addr)
    assert peer.wait_while_talking(lambda: peer.goaway is not None, silence=0.5)
    started = time.monotonic()
    assert not peer.wait_while_talking(lambda: peer.status.get(1) == 0, silence=0.5)
    assert time.monotonic() - started >= 0.5
    peer.close()
