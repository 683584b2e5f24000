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
import struct
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


@pytest.fixture
def resetting_server() -> Iterator[str]:
    """Sends a GOAWAY, then closes without reading what the peer sent: the
    kernel answers the peer's bytes with a reset."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        conn.sendall(p.frame(p.GOAWAY, 0, 0, struct.pack(">II", 0, p.FLOW_CONTROL_ERROR)))
        time.sleep(0.1)  # the peer's preface is in, unread: the close resets
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_a_failed_write_does_not_hide_the_goaway_before_the_reset(
    resetting_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI once failed h2-flow_control_overrun with "closed" and no GOAWAY: the
    attacking thread's write hit the reset and declared the connection ended
    while the reader had the GOAWAY in hand, unparsed. Here the reader is
    held at the GOAWAY until after the failed write, so that order is certain."""
    original = p.Peer._frame
    go_on = threading.Event()

    def held(self, kind, *args) -> None:
        if kind == p.GOAWAY:
            self.cv.release()  # as a loaded machine's reader thread: late, not locked
            go_on.wait(10)
            self.cv.acquire()
        original(self, kind, *args)

    monkeypatch.setattr(p.Peer, "_frame", held)
    peer = p.Peer(resetting_server)
    deadline = time.monotonic() + 10
    while peer.send(bytes(65_536), deadline):
        pass
    # The precondition: the write failed, and the reader has not parsed the GOAWAY.
    assert peer.write_failed and peer.goaway is None
    threading.Timer(0.3, go_on.set).start()
    assert peer.wait(lambda: peer.goaway is not None or peer.eof, 10)
    assert peer.goaway == (p.FLOW_CONTROL_ERROR, 0), peer.reaction()
    assert peer.wait(lambda: peer.eof, 10)  # then the reset, seen by the reader
    peer.close()


@pytest.fixture
def quiet_server() -> Iterator[str]:
    """Accepts any number of connections and never sends a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for conn in held:
        conn.close()


def test_many_waits_run_side_by_side(server, quiet_server, slow_parsing) -> None:
    """Four silent peers and one whose answer comes after a long flood: each gets
    the outcome a wait of its own gives, and the silences overlap (held_headers
    waits on 42 connections: one after the other that was 42 s). In a row, the
    four silences would start once the flood's answer is in and add 4 s to it."""
    addr, _ = server
    started = time.monotonic()
    talking = p.Peer(addr)
    silent = [p.Peer(quiet_server) for _ in range(4)]
    answered: list[float] = []

    def until(peer: p.Peer) -> bool:
        if peer.goaway is None:
            return False
        answered.append(time.monotonic())
        return True

    outcome = p.wait_all_while_talking([talking, *silent], until, silence=1.0)
    ended = time.monotonic()
    assert outcome == [True] + [False] * 4
    assert talking.frames_in >= ACKS
    # The precondition: the flood outlasted the silence many times.
    assert answered[0] - started >= ACKS * SLOW_PER_FRAME
    assert ended - answered[0] < 2.0  # in a row: at least 4 s more
    for peer in [*silent, talking]:
        peer.close()
