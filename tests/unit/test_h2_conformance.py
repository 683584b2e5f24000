"""backend/h2grpc against an independent, strict HTTP/2 implementation.

The rest of the suite talks to the server through grpc's C-core client, which
is forgiving, and hand-written frames. Here the client is hyper-h2's state
machine (python-hyper, the HTTP/2 core of httpx and others): it raises on any
protocol violation by the server, such as DATA beyond the window it granted,
frames larger than its SETTINGS_MAX_FRAME_SIZE, frames on a closed stream, or
malformed, uppercase or connection-specific response headers. Each test then
checks what the gRPC layer must add on top: message framing, status trailers,
flow control that follows the client's window and SETTINGS changes, resets.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import h2.errors as h2_errors
import h2.settings as h2_settings
import pytest

from backend.gen import backend_pb2 as pb
from backend.h2grpc import connection, frames
from backend.h2grpc.inflow import RECV_WINDOW
from tests.h2client import H2Client, Stream
from tests.h2server import Running

pytestmark = pytest.mark.timeout(120)

INITIAL_WINDOW_SIZE = h2_settings.SettingCodes.INITIAL_WINDOW_SIZE


def _blocked_stream(server: Running, request: pb.PredictOptions) -> tuple[H2Client, int, Stream]:
    """A PredictStream whose client granted a 1000-byte window and stopped
    acknowledging: the server must have stopped at the window's edge."""
    client = H2Client(server.addr, INITIAL_WINDOW_SIZE=1000)
    client.auto_ack = False
    sid = client.call("PredictStream", request)
    stream = client.streams[sid]
    assert client.pump(lambda: len(stream.body) >= 900)
    client.idle(0.5)
    assert len(stream.body) <= 1000 and not stream.ended
    return client, sid, stream


@pytest.fixture
def client(server: Running) -> Iterator[H2Client]:
    c = H2Client(server.addr)
    yield c
    c.close()


def test_unary_response_is_well_formed(client: H2Client) -> None:
    sid = client.call("Predict", pb.PredictOptions(Prompt="héllo"))
    assert client.pump(lambda: client.streams[sid].ended)
    stream = client.streams[sid]
    assert stream.headers[":status"] == "200"
    assert stream.headers["content-type"] == "application/grpc"
    assert stream.status() == (0, "")
    (message,) = stream.messages()
    assert pb.Reply.FromString(message).message == "héllo".encode()


def test_error_is_a_trailers_only_response_with_an_encoded_message(client: H2Client) -> None:
    sid = client.call("TokenizeString", pb.PredictOptions(Prompt="bad: 100% ünïcode\nline"))
    assert client.pump(lambda: client.streams[sid].ended)
    stream = client.streams[sid]
    assert not stream.trailers and not stream.body, "trailers-only: one HEADERS with END_STREAM"
    code, message = stream.status()
    assert code == 3
    # Percent-encoded per the gRPC HTTP/2 spec: only printable ASCII except '%' stays.
    assert message == "bad: 100%25 %C3%BCn%C3%AFcode%0Aline"


def test_the_server_never_exceeds_the_stream_window_and_follows_window_updates(
    server: Running,
) -> None:
    """A 1000-byte stream window and no WINDOW_UPDATE: the server stops there
    (hyper-h2 raises FlowControlError on a single byte more); acknowledging
    lets the rest through, in order."""
    client, sid, stream = _blocked_stream(server, pb.PredictOptions(Tokens=300, Batch=50))
    try:
        client.read_on(sid)
        assert client.pump(lambda: stream.ended, timeout=30)
        replies = [pb.Reply.FromString(m) for m in stream.messages()]
        assert [r.tokens for r in replies] == list(range(300))
        assert stream.status() == (0, "")
    finally:
        client.close()


def test_a_larger_initial_window_in_settings_reopens_blocked_streams(server: Running) -> None:
    """SETTINGS_INITIAL_WINDOW_SIZE changes apply to open streams (RFC 9113
    §6.9.2): raising it mid-stream must resume a stream blocked on its window,
    with no WINDOW_UPDATE for the stream."""
    client, sid, stream = _blocked_stream(server, pb.PredictOptions(Tokens=100, Batch=100))
    try:
        client.conn.update_settings({INITIAL_WINDOW_SIZE: 60_000})
        client.flush()
        # Only the stream window grew; the connection window still has room.
        assert client.pump(lambda: len(stream.body) > 5000), len(stream.body)
        client.read_on(sid)
        assert client.pump(lambda: stream.ended, timeout=30)
        assert len(stream.messages()) == 100
    finally:
        client.close()


def test_frames_respect_the_peer_max_frame_size_and_connection_window(client: H2Client) -> None:
    """A 3 MB reply: many DATA frames, none above the client's 16 KiB
    SETTINGS_MAX_FRAME_SIZE, across many connection windows of 64 KiB."""
    sid = client.call("PredictStream", pb.PredictOptions(Tokens=2, Batch=3_000_000))
    assert client.pump(lambda: client.streams[sid].ended, timeout=60)
    stream = client.streams[sid]
    assert 0 < stream.largest_frame <= 16_384
    assert [len(pb.Reply.FromString(m).message) for m in stream.messages()] == [3_000_000] * 2


def test_many_interleaved_streams_each_complete(client: H2Client) -> None:
    sids = [
        client.call("PredictStream", pb.PredictOptions(Tokens=40, Batch=200 + i)) for i in range(50)
    ]
    assert client.pump(lambda: all(client.streams[s].ended for s in sids), timeout=60)
    for i, sid in enumerate(sids):
        replies = [pb.Reply.FromString(m) for m in client.streams[sid].messages()]
        assert [r.tokens for r in replies] == list(range(40))
        assert all(len(r.message) == 200 + i for r in replies)


def test_a_reset_stream_is_cancelled_and_the_connection_serves_on(
    server: Running, client: H2Client
) -> None:
    sid = client.call(
        "PredictStream", pb.PredictOptions(Tokens=10_000, TopP=5, CorrelationId="reset-me")
    )
    assert client.pump(lambda: len(client.streams[sid].body) > 0)
    client.conn.reset_stream(sid, error_code=h2_errors.ErrorCodes.CANCEL)
    client.flush()
    # Frames the server had already queued for the stream are allowed (and
    # ignored by hyper-h2); anything else on it would be a protocol error.
    client.idle(0.3)
    deadline = time.monotonic() + 10
    while "reset-me" not in server.servicer.cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reset-me" in server.servicer.cancelled
    again = client.call("Predict", pb.PredictOptions(Prompt="still here"))
    assert client.pump(lambda: client.streams[again].ended)
    assert client.streams[again].status() == (0, "")


def test_ping_is_acked(client: H2Client) -> None:
    client.conn.ping(b"12345678")
    client.flush()
    assert client.pump(lambda: client.pings_acked == 1)


def test_stop_sends_goaway_with_no_error(server: Running, client: H2Client) -> None:
    # hyper-h2 closes its side on GOAWAY, so the graceful finish of open
    # calls is tested with grpc's client (test_h2grpc), not here.
    sid = client.call("Health", pb.HealthMessage())
    assert client.pump(lambda: client.streams[sid].ended)
    server.loop.call_soon_threadsafe(lambda: server.loop.create_task(server.server.stop(1.0)))
    assert client.pump(lambda: client.terminated is not None)
    assert client.terminated.error_code == h2_errors.ErrorCodes.NO_ERROR
    assert client.terminated.last_stream_id == sid


# ---- what the server grants a client that sends ------------------------------


def _granted(client: H2Client) -> int:
    """The connection window the server has granted and the client not used."""
    return int(client.conn.outbound_flow_control_window)


def _open(client: H2Client, method: str) -> int:
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(
        sid,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", f"/backend.Backend/{method}"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    client.streams[sid] = Stream()
    return sid


def _framed(request: pb.PredictOptions) -> bytes:
    data = request.SerializeToString()
    return struct.pack(">BI", 0, len(data)) + data


def _send(client: H2Client, sid: int, data: bytes) -> None:
    step = client.conn.max_outbound_frame_size
    for at in range(0, len(data), step):
        client.conn.send_data(sid, data[at : at + step])
    client.flush()


def _ready(client: H2Client) -> None:
    """Read the server's SETTINGS and its connection WINDOW_UPDATE."""
    assert client.pump(lambda: _granted(client) == RECV_WINDOW)


def test_window_for_a_request_comes_back_when_its_handler_gets_it(client: H2Client) -> None:
    """Complete messages whose stream has not ended cannot start a handler: the
    server must keep their window (a peer then cannot make it hold more than it
    granted). Ending the streams hands them over, and the window comes back."""
    _ready(client)
    message = _framed(pb.PredictOptions(Prompt="m" * 1_000_000))
    sids = []
    while _granted(client) >= len(message):
        sids.append(_open(client, "Predict"))
        _send(client, sids[-1], message)
    assert len(sids) == RECV_WINDOW // len(message)
    left = _granted(client)
    client.idle(0.5)
    assert _granted(client) == left, "window came back for requests no handler has"
    for sid in sids:
        client.conn.end_stream(sid)
    client.flush()
    assert client.pump(lambda: all(client.streams[s].ended for s in sids))
    for sid in sids:
        assert client.streams[sid].status() == (0, "")
        assert len(pb.Reply.FromString(client.streams[sid].messages()[0]).message) == 1_000_000
    # Given back in batches of at least half the window.
    assert _granted(client) > RECV_WINDOW // 2 > left


def test_interleaved_requests_larger_than_the_window_all_complete(client: H2Client) -> None:
    """Six 1.5 MB requests sent together, round-robin in 16 KiB frames as grpc
    clients send them: 9 MB on a 4 MiB connection window. Each admitted message
    keeps the window it still needs, so none waits for window the others hold."""
    _ready(client)
    sids = [_open(client, "Predict") for _ in range(6)]
    left = {sid: _framed(pb.PredictOptions(Prompt=f"{sid}" * 1_500_000)) for sid in sids}

    def room(sid: int) -> int:
        return min(client.conn.local_flow_control_window(sid), client.conn.max_outbound_frame_size)

    while any(left.values()):
        sent = False
        for sid in sids:
            n = min(room(sid), len(left[sid]))
            if n <= 0:
                continue
            client.conn.send_data(sid, left[sid][:n], end_stream=n == len(left[sid]))
            left[sid] = left[sid][n:]
            sent = True
        client.flush()
        if not sent:
            waiting = [s for s in sids if left[s]]
            assert client.pump(lambda w=waiting: any(room(s) > 0 for s in w), timeout=5), (
                f"no window for {len(waiting)} unfinished requests: they wait for each other"
            )
    assert client.pump(lambda: all(client.streams[s].ended for s in sids), timeout=30)
    for sid in sids:
        (reply,) = client.streams[sid].messages()
        assert pb.Reply.FromString(reply).message == f"{sid}".encode() * 1_500_000


def test_a_connection_holds_no_more_than_its_bound_of_unfinished_requests(
    server: Running, client: H2Client
) -> None:
    """Requests that never end, each declaring the largest allowed message:
    beyond server.max_buffered (held + still owed) new ones are refused with
    RESOURCE_EXHAUSTED at their first DATA, and the connection still serves."""
    _ready(client)
    limit = server.server.max_message_bytes
    prefix = struct.pack(">BI", 0, limit // 3)
    sids = [_open(client, "Predict") for _ in range(6)]
    for sid in sids:
        client.conn.send_data(sid, prefix)
    client.flush()
    refused = lambda: [s for s in sids if client.streams[s].ended]  # noqa: E731
    assert client.pump(lambda: len(refused()) >= 1)
    client.idle(0.3)
    admitted = len(sids) - len(refused())
    assert admitted * (limit // 3 + 5) <= server.server.max_buffered
    assert admitted >= 3
    for sid in refused():
        assert client.streams[sid].status()[0] == 8, client.streams[sid].status()
    again = client.call("Predict", pb.PredictOptions(Prompt="still here"))
    assert client.pump(lambda: client.streams[again].ended)
    assert client.streams[again].status() == (0, "")


def test_the_server_stops_at_the_connection_window_and_resumes_on_window_update(
    server: Running,
) -> None:
    """Three streams whose replies together exceed the client's 65 535-byte
    connection window (its stream windows are 1 MB each): the server stops at
    the connection window's edge, and the WINDOW_UPDATEs let the rest through."""
    client = H2Client(server.addr, INITIAL_WINDOW_SIZE=1_000_000)
    try:
        client.auto_ack = False
        sids = [
            client.call("PredictStream", pb.PredictOptions(Tokens=10, Batch=20_000))
            for _ in range(3)
        ]
        total = lambda: sum(len(client.streams[s].body) for s in sids)  # noqa: E731
        assert client.pump(lambda: total() >= 60_000)
        client.idle(0.5)
        assert total() <= 65_535 and not any(client.streams[s].ended for s in sids)
        client.read_on(*sids)
        assert client.pump(lambda: all(client.streams[s].ended for s in sids), timeout=30)
        for sid in sids:
            assert [
                len(pb.Reply.FromString(m).message) for m in client.streams[sid].messages()
            ] == [20_000] * 10
    finally:
        client.close()


# ---- connections: idle bound and cap -------------------------------------------


def _closed(client: H2Client, timeout: float) -> bool:
    """Read (through hyper-h2) until the server closes the socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = client.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        if not data:
            return True
        for event in client.conn.receive_data(data):
            client._handle(event)
    return False


def test_an_idle_connection_gets_goaway_no_error_then_is_closed() -> None:
    """No stream open for idle_timeout: GOAWAY(NO_ERROR) naming the last stream
    served, the close a moment later. A stream that runs longer than the bound
    keeps the connection; the clock starts when it ends."""
    running = Running(idle_timeout=0.4)
    client = H2Client(running.addr)
    try:
        sid = client.call("PredictStream", pb.PredictOptions(Tokens=8, TopP=100))
        assert client.pump(lambda: client.streams[sid].ended, timeout=10)
        ended = time.monotonic()
        assert client.streams[sid].status() == (0, "") and client.terminated is None
        assert len(client.streams[sid].messages()) == 8
        assert client.pump(lambda: client.terminated is not None, timeout=5)
        waited = time.monotonic() - ended
        assert 0.3 <= waited < 2.0, waited
        assert client.terminated.error_code == h2_errors.ErrorCodes.NO_ERROR
        assert client.terminated.last_stream_id == sid
        assert _closed(client, 5)
    finally:
        client.close()
        running.close()


def _health(client: H2Client) -> None:
    sid = client.call("Health", pb.HealthMessage())
    assert client.pump(lambda: client.streams[sid].ended)
    assert client.streams[sid].status() == (0, "")


def _long_call(client: H2Client) -> int:
    """A stream running until the test ends (its first message has arrived:
    the server counts the call as running)."""
    sid = client.call("PredictStream", pb.PredictOptions(Tokens=10_000, TopP=20))
    assert client.pump(lambda: len(client.streams[sid].body) > 0)
    return sid


def _evicted(client: H2Client) -> None:
    assert _closed(client, 5), "the connection idle longest was kept"
    assert client.terminated is not None
    assert client.terminated.error_code == h2_errors.ErrorCodes.NO_ERROR
    assert client.terminated.additional_data == b"connection cap reached"


def test_at_the_cap_the_connection_idle_longest_makes_room_for_a_new_one() -> None:
    """With 3 connections open (the cap), a new one is admitted and the one
    without a call running for the longest is closed (GOAWAY(NO_ERROR), which
    a client follows by reconnecting); connections with calls running are
    never evicted, and only when all have one is the newcomer refused."""
    running = Running(max_connections=3)
    a, b, c = (H2Client(running.addr) for _ in range(3))
    clients = [a, b, c]
    try:
        for client in (c, a, b):  # idle longest: c, then a, then b
            _health(client)
        busy_b = _long_call(b)
        d = H2Client(running.addr)  # c goes: idle longest
        clients.append(d)
        _health(d)
        _evicted(c)
        e = H2Client(running.addr)  # a goes (b has a call running)
        clients.append(e)
        _health(e)
        _evicted(a)
        _health(d)  # the survivors are served
        for client in (d, e):
            _long_call(client)
        f = H2Client(running.addr)  # every connection has a call running: refused
        try:
            assert _closed(f, 5), "a connection over the cap was kept"
            assert f.terminated is not None
            assert f.terminated.error_code == h2_errors.ErrorCodes.ENHANCE_YOUR_CALM
            assert f.terminated.additional_data == b"too many connections"
        finally:
            f.close()
        before = len(b.streams[busy_b].body)
        assert b.pump(lambda: len(b.streams[busy_b].body) > before)  # b's call runs on
        assert b.terminated is None and not b.streams[busy_b].ended
        assert running.server.drops.totals == {"evicted": 2, "over_cap": 1}
    finally:
        for client in clients:
            client.close()
        running.close()


def test_a_connection_error_half_closes_after_the_goaway_and_drains_the_peer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer still writing when it commits a connection error (here: a frame
    larger than 16384 bytes, then 1 MiB more) must get the GOAWAY saying why,
    then a FIN: not a reset. Closed at once with those bytes unread, the
    kernel resets the connection, and a reset can discard the GOAWAY before it
    leaves. Then the connection ends within GOAWAY_LINGER even though this
    peer never closes it, and the server serves others."""
    # Milliseconds of writing against seconds of linger, however loaded the machine.
    monkeypatch.setattr(connection, "GOAWAY_LINGER", 3.0)
    running = Running()
    sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)
    try:
        bad = struct.pack(">I", 20_000)[1:] + bytes([0, 0]) + struct.pack(">I", 1)
        sock.sendall(frames.PREFACE + frames.frame(frames.SETTINGS, 0, 0) + bad)
        sock.sendall(bytes(1024 * 1024))  # raises ConnectionResetError on a reset
        data = bytearray()
        while chunk := sock.recv(65_536):  # raises ConnectionResetError on a reset
            data += chunk
        goaways = [p for kind, p in _raw_frames(bytes(data)) if kind == frames.GOAWAY]
        assert len(goaways) == 1, data
        last, code = struct.unpack_from(">II", goaways[0])
        assert (last, code) == (0, h2_errors.ErrorCodes.FRAME_SIZE_ERROR)
        assert goaways[0][8:] == b"frame larger than 16384 bytes"
        deadline = time.monotonic() + connection.GOAWAY_LINGER + 10
        while running.server.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not running.server.connections, "the lingering connection was never closed"
        other = H2Client(running.addr)
        sid = other.call("Health", pb.HealthMessage())
        assert other.pump(lambda: other.streams[sid].ended)
        assert other.streams[sid].status() == (0, "")
        other.close()
    finally:
        sock.close()
        running.close()


def _raw_frames(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while len(data) - pos >= 9:
        length = int.from_bytes(data[pos : pos + 3], "big")
        yield data[pos + 3], data[pos + 9 : pos + 9 + length]
        pos += 9 + length
