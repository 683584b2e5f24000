"""backend/h2grpc against real clients: grpc's C-core client (the one the
rest of the suite uses) and raw HTTP/2 frames for what a well-behaved client
never sends. No engine: a small servicer on the Backend service stands in.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import random
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import grpc
import hpack
import pytest

from backend.gen import backend_pb2 as pb
from backend.gen import backend_pb2_grpc
from backend.h2grpc import connection as connection_module
from backend.h2grpc import frames, liveness, pace
from backend.h2grpc import server as server_module
from backend.h2grpc.connection import Connection
from backend.h2grpc.server import Server
from tests.h2server import Running

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret"


@pytest.fixture
def stub(server: Running) -> Iterator[backend_pb2_grpc.BackendStub]:
    with server.channel(("grpc.max_receive_message_length", 64 * 1024 * 1024)) as channel:
        yield backend_pb2_grpc.BackendStub(channel)


def test_unary_and_metadata(stub: backend_pb2_grpc.BackendStub) -> None:
    assert stub.Health(pb.HealthMessage(), timeout=10).message == b"OK"
    reply = stub.Predict(pb.PredictOptions(Prompt="héllo"), metadata=(("x-echo", "abc"),))
    assert reply.message == "héllo".encode() and reply.tokens == 3


def test_stream_order_and_content(stub: backend_pb2_grpc.BackendStub) -> None:
    replies = list(stub.PredictStream(pb.PredictOptions(Tokens=500), timeout=30))
    assert [r.tokens for r in replies] == list(range(500))
    assert replies[27].message == b"B"


def test_large_messages_both_ways(stub: backend_pb2_grpc.BackendStub) -> None:
    """Several frames and several flow-control windows in each direction."""
    prompt = "x" * (5 * 1024 * 1024)
    assert stub.Predict(pb.PredictOptions(Prompt=prompt), timeout=60).message == prompt.encode()
    replies = list(stub.PredictStream(pb.PredictOptions(Tokens=3, Batch=3_000_000), timeout=60))
    assert [len(r.message) for r in replies] == [3_000_000] * 3


def test_requests_larger_than_the_window_left_in_sequence_are_all_answered(
    server: Running,
) -> None:
    """680 kB, 680 kB, 170 kB, then 2.7 MB on one connection: the window still
    due back to the client (given back in 2 MiB batches) was counted as
    granted, so the last message, larger than what the client had left, never
    got a WINDOW_UPDATE and its call hung until the deadline (found sending
    images, tests/integration/test_vision.py)."""
    options = ("grpc.use_local_subchannel_pool", 1)  # a connection of its own
    with server.channel(("grpc.max_receive_message_length", 64 * 2**20), options) as channel:
        stub = backend_pb2_grpc.BackendStub(channel)
        for size in (680_000, 680_000, 170_000, 2_720_000):
            reply = stub.Predict(pb.PredictOptions(Prompt="x" * size), timeout=20)
            assert len(reply.message) == size


def test_a_client_with_a_small_window_gets_everything(server: Running) -> None:
    """grpc's C-core client grants 64 KiB and no BDP growth: 2 MB of replies
    arrive whole. (That the server really stops at a window's edge and resumes
    on WINDOW_UPDATE is shown with hyper-h2, which raises on any overrun:
    test_h2_conformance's stream and connection window tests.)"""
    options = (("grpc.http2.lookahead_bytes", 65_535), ("grpc.http2.bdp_probe", 0))
    with server.channel(*options) as channel:
        stub = backend_pb2_grpc.BackendStub(channel)
        request = pb.PredictOptions(Tokens=40, Batch=50_000)
        replies = list(stub.PredictStream(request, timeout=60))
    assert len(replies) == 40 and all(len(r.message) == 50_000 for r in replies)


def test_many_concurrent_streams_on_one_connection(stub: backend_pb2_grpc.BackendStub) -> None:
    calls = [
        stub.PredictStream(pb.PredictOptions(Tokens=50, TopP=1, Batch=i + 1)) for i in range(200)
    ]
    for i, call in enumerate(calls):
        replies = list(call)
        assert [r.tokens for r in replies] == list(range(50))
        assert all(len(r.message) == i + 1 for r in replies)


def test_gzip_compressed_request(stub: backend_pb2_grpc.BackendStub) -> None:
    prompt = "compress me " * 1000
    reply = stub.Predict(pb.PredictOptions(Prompt=prompt), compression=grpc.Compression.Gzip)
    assert reply.message == prompt.encode()


@pytest.mark.parametrize(
    "prompt, code, details",
    [
        ("bad value: ünïcode 100%", grpc.StatusCode.INVALID_ARGUMENT, "bad value: ünïcode 100%"),
        ("raise", grpc.StatusCode.UNKNOWN, "Unexpected RuntimeError"),
    ],
)
def test_status_and_details(stub: Any, prompt: str, code: grpc.StatusCode, details: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.TokenizeString(pb.PredictOptions(Prompt=prompt), timeout=10)
    assert err.value.code() == code and err.value.details() == details


def test_unknown_method_is_unimplemented(server: Running) -> None:
    with server.channel() as channel:
        call = channel.unary_unary("/backend.Backend/Nope")
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "/backend.Backend/Nope" in err.value.details()


def test_undecodable_request_is_invalid_argument(server: Running) -> None:
    with server.channel() as channel:
        call = channel.unary_unary("/backend.Backend/Predict")
        bad = (
            pb.PredictOptions(Prompt="MARK")
            .SerializeToString()
            .replace(b"MARK", b"\xff\xfe\xff\xfe")
        )
        with pytest.raises(grpc.RpcError) as err:
            call(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "backend.PredictOptions" in err.value.details()
        assert "UTF-8" in err.value.details()
        call = channel.unary_unary("/backend.Backend/Predict")
        with pytest.raises(grpc.RpcError) as err:
            call(b"\x0a\xff", timeout=10)  # truncated field
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_oversized_request_is_resource_exhausted() -> None:
    running = Running(max_message_bytes=1000)
    try:
        with running.channel() as channel:
            stub = backend_pb2_grpc.BackendStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(pb.PredictOptions(Prompt="y" * 5000), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in err.value.details()
            assert stub.Predict(pb.PredictOptions(Prompt="ok"), timeout=10).message == b"ok"
    finally:
        running.close()


def test_auth() -> None:
    running = Running(auth_token=TOKEN)
    try:
        with running.channel() as channel:
            stub = backend_pb2_grpc.BackendStub(channel)
            good = (("authorization", f"Bearer {TOKEN}"),)
            assert stub.Health(pb.HealthMessage(), metadata=good, timeout=10).message == b"OK"
            for metadata in ((), (("authorization", f"Bearer {TOKEN}x"),)):
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.PredictStream(pb.PredictOptions(Tokens=2), metadata=metadata))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.close()


def _wait(predicate: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_client_cancel_cancels_the_handler(server: Running, stub: Any) -> None:
    call = stub.PredictStream(pb.PredictOptions(Tokens=10_000, TopP=5, CorrelationId="c1"))
    next(call)
    call.cancel()
    assert _wait(lambda: "c1" in server.servicer.cancelled)


def test_deadline_cancels_the_handler(server: Running, stub: Any) -> None:
    request = pb.PredictOptions(TopP=10_000, CorrelationId="d1")
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(request, timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait(lambda: "d1" in server.servicer.cancelled)


def test_deadline_is_enforced_by_the_server_too(server: Running) -> None:
    """A client that sends grpc-timeout but never resets the stream still
    gets DEADLINE_EXCEEDED from us, and the handler is cancelled."""
    with RawClient(server.port) as raw:
        raw.request(
            1,
            "/backend.Backend/Predict",
            pb.PredictOptions(TopP=10_000, CorrelationId="d2"),
            ("grpc-timeout", "300m"),
        )
        headers = raw.read_until_end(1)
    assert ("grpc-status", "4") in headers
    assert _wait(lambda: "d2" in server.servicer.cancelled)


def test_a_vanished_connection_cancels_its_handlers(server: Running) -> None:
    with RawClient(server.port) as raw:
        raw.request(
            1,
            "/backend.Backend/PredictStream",
            pb.PredictOptions(Tokens=10_000, TopP=5, CorrelationId="gone"),
        )
        assert server.servicer.started.wait(10)
    assert _wait(lambda: "gone" in server.servicer.cancelled)


def test_window_updates_that_return_sent_data_are_not_a_flood(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client returning window for every DATA frame it reads (its stream's
    and the connection's: two WINDOW_UPDATEs a frame, as grpc's C-core client
    does with many streams) is served however fast it reads; the same number
    of WINDOW_UPDATEs for nothing sent is a flood. The flood window is made
    an hour long so that the verdict does not depend on how fast this runs."""
    monkeypatch.setattr(connection_module, "ABUSE_WINDOW", 3600.0)
    messages = 3 * connection_module.ABUSE_LIMIT
    with RawClient(server.port) as raw:
        raw.request(1, "/backend.Backend/PredictStream", pb.PredictOptions(Tokens=messages))
        data_frames = 0
        while True:
            kind, flags, sid, payload = raw.read_frame()
            assert kind != frames.GOAWAY, f"closed after {data_frames} DATA frames: {payload!r}"
            if kind == frames.DATA and payload:
                data_frames += 1
                grant = len(payload).to_bytes(4, "big")
                raw.send(frames.WINDOW_UPDATE, 0, sid, grant)
                raw.send(frames.WINDOW_UPDATE, 0, 0, grant)
            if sid == 1 and flags & frames.END_STREAM:
                break
        assert data_frames >= messages  # a message split at a window edge takes two
        # Unearned: every one counts, and the connection is closed.
        flood = frames.frame(frames.WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big"))
        raw.sock.sendall(flood * (connection_module.ABUSE_LIMIT + 1))
        kind, _flags, _sid, payload = raw.read_frame(lambda f: f[0] == frames.GOAWAY)
        assert int.from_bytes(payload[4:8], "big") == frames.ENHANCE_YOUR_CALM, payload


def test_unfinished_uploads_are_bounded_per_worker_not_only_per_connection() -> None:
    """Each connection starts a ~1 MiB request and stops after 16 bytes. Two
    fit the worker's 2.5 MiB; the third is refused though its own connection
    holds nothing else; a closed connection gives its share back."""
    running = Running(max_message_bytes=2**20, max_buffered_total=5 * 2**19)
    pool = running.server.request_bytes
    # PredictStream ignores Grammar: a one-byte reply to a ~1 MiB request.
    body = grpc_message(pb.PredictOptions(Tokens=1, Grammar="z" * (2**20 - 16)))

    def start(raw: RawClient) -> None:
        raw.open(1, "/backend.Backend/PredictStream")
        raw.send(frames.DATA, 0, 1, body[:16])

    try:
        clients = [RawClient(running.port) for _ in range(4)]
        for n, raw in enumerate(clients[:2], 1):
            start(raw)  # held: 16 bytes; owed: the rest
            assert _wait(lambda n=n: pool.held == n * len(body)), pool.held
        start(clients[2])
        headers = dict(clients[2].read_until_end(1))
        assert headers["grpc-status"] == "8", headers
        assert "in this worker" in headers["grpc-message"], headers
        assert _wait(lambda: pool.held == 2 * len(body)), pool.held
        clients[0].sock.close()  # gone mid-upload: its share leaves the total
        assert _wait(lambda: pool.held == len(body)), pool.held
        start(clients[3])
        for raw in (clients[1], clients[3]):
            rest = body[16:]
            for i in range(0, len(rest), frames.MAX_FRAME):
                last = i + frames.MAX_FRAME >= len(rest)
                chunk = rest[i : i + frames.MAX_FRAME]
                raw.send(frames.DATA, frames.END_STREAM if last else 0, 1, chunk)
            assert dict(raw.read_until_end(1))["grpc-status"] == "0"
        assert _wait(lambda: pool.held == 0), pool.held
        for raw in clients[1:]:
            raw.sock.close()
    finally:
        running.close()


def test_pings_are_answered_and_a_bad_preface_is_refused(server: Running) -> None:
    with RawClient(server.port) as raw:
        raw.send(frames.PING, 0, 0, b"12345678")
        _kind, flags, _, payload = raw.read_frame(lambda f: f[0] == frames.PING)
        assert flags & frames.ACK and payload == b"12345678"
        raw.send(frames.PING, 0, 0, b"second..")
        raw.send(frames.PING, 0, 0, b"third...")
        acks = [raw.read_frame(lambda f: f[0] == frames.PING)[3] for _ in range(2)]
        assert acks == [b"second..", b"third..."]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        # Our SETTINGS, then GOAWAY(PROTOCOL_ERROR), then the close.
        assert struct.pack(">B", frames.GOAWAY) in data[:200] and b"preface" in data


def test_dropped_connections_are_logged_at_most_once_per_interval(
    server: Running, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How many connections we drop is the peer's choice: 50 bad prefaces give
    one warning, not 50; the next warning after the interval counts the rest."""

    def bad_preface() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            while sock.recv(65536):  # until the server's close
                pass

    def warnings() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if "not an HTTP/2 client preface" in r.getMessage()
        ]

    with caplog.at_level(logging.WARNING, logger="backend.h2grpc"):
        for _ in range(50):
            bad_preface()
        assert len(warnings()) == 1, warnings()
        # The interval has passed (as if): the next drop is logged, with the count.
        monkeypatch.setattr(server_module, "DROP_LOG_INTERVAL", 0.0)
        bad_preface()
        assert _wait(lambda: len(warnings()) == 2), warnings()
        assert "(49 more like it unlogged" in warnings()[1]


def test_stop_refuses_new_calls_and_cuts_running_ones_after_the_grace(server: Running) -> None:
    with server.channel() as channel:
        stub = backend_pb2_grpc.BackendStub(channel)
        call = stub.PredictStream(pb.PredictOptions(Tokens=10_000, TopP=5, CorrelationId="s1"))
        next(call)
        started = time.monotonic()
        server.stop(grace=1.0)
        took = time.monotonic() - started
        with pytest.raises(grpc.RpcError) as err:
            for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert 0.9 <= took < 10, took
        assert "s1" in server.servicer.cancelled
        with pytest.raises(grpc.RpcError) as err:
            stub.Health(pb.HealthMessage(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_stop_lets_short_calls_finish(server: Running) -> None:
    with server.channel() as channel:
        stub = backend_pb2_grpc.BackendStub(channel)
        call = stub.PredictStream(pb.PredictOptions(Tokens=20, TopP=20))
        next(call)
        server.stop(grace=10.0)
        assert len(list(call)) == 19


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str) -> Any:
        return None

    def close(self) -> None:
        pass


def test_ping_acks_are_paced() -> None:
    """The first PING is answered at once; those within PING_ACK_INTERVAL of
    an ACK wait and are answered together (grpc-go's BDP pings otherwise cost
    a wake-up per streamed token)."""
    loop = asyncio.new_event_loop()
    try:
        conn = Connection(Server({}))
        transport = _Transport()

        async def scenario() -> list[list[bytes]]:
            conn.connection_made(transport)  # type: ignore[arg-type]
            await asyncio.sleep(0)  # frames leave once per loop iteration
            transport.written.clear()  # our SETTINGS
            seen = []
            for payload in (b"first...", b"second..", b"third..."):
                conn.liveness.on_ping(payload)
                await asyncio.sleep(0)
                seen.append(list(transport.written))
            await asyncio.sleep(liveness.PING_ACK_INTERVAL + 0.05)
            seen.append(list(transport.written))
            conn.connection_lost(None)
            return seen

        seen = loop.run_until_complete(scenario())
    finally:
        loop.close()
    ack = lambda p: frames.frame(frames.PING, frames.ACK, 0, p)  # noqa: E731
    assert seen[0] == [ack(b"first...")]
    assert seen[1] == seen[2] == [ack(b"first...")]
    assert seen[3] == [ack(b"first..."), ack(b"second..") + ack(b"third...")]


def grpc_message(message: Any) -> bytes:
    data = message.SerializeToString()
    return struct.pack(">BI", 0, len(data)) + data


class RawClient:
    """Hand-written HTTP/2 frames over a socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(frames.PREFACE + frames.frame(frames.SETTINGS, 0, 0))
        self.buffer = b""
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sock.close()

    def send(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        self.sock.sendall(frames.frame(kind, flags, stream_id, payload))

    def request(self, stream_id: int, path: str, message: Any, *extra: tuple[str, str]) -> None:
        self.open(stream_id, path, *extra)
        self.send(frames.DATA, frames.END_STREAM, stream_id, grpc_message(message))

    def open(self, stream_id: int, path: str, *extra: tuple[str, str]) -> None:
        """The call's HEADERS; its DATA is the caller's."""
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *extra,
        ]
        self.send(frames.HEADERS, frames.END_HEADERS, stream_id, self.encoder.encode(headers))

    def read_frame(self, want: Any = lambda f: True) -> tuple[int, int, int, bytes]:
        while True:
            while len(self.buffer) < 9 or len(self.buffer) < 9 + int.from_bytes(
                self.buffer[:3], "big"
            ):
                chunk = self.sock.recv(65536)
                assert chunk, "connection closed"
                self.buffer += chunk
            length = int.from_bytes(self.buffer[:3], "big")
            frame = (
                self.buffer[3],
                self.buffer[4],
                int.from_bytes(self.buffer[5:9], "big"),
                self.buffer[9 : 9 + length],
            )
            self.buffer = self.buffer[9 + length :]
            if frame[0] == frames.SETTINGS and not frame[1] & frames.ACK:
                self.send(frames.SETTINGS, frames.ACK, 0)
            if want(frame):
                return frame

    def read_until_end(self, stream_id: int) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        while True:
            kind, flags, _sid, payload = self.read_frame(lambda f: f[2] == stream_id)
            if kind == frames.HEADERS:
                headers += [(str(k), str(v)) for k, v in self.decoder.decode(payload)]
            if flags & frames.END_STREAM or kind == frames.RST_STREAM:
                return headers


# ---- what one peer may cost (issue 23) -----------------------------------------

REQUEST_HEADERS = [
    (":method", "POST"), (":scheme", "http"), (":path", "/backend.Backend/Health"),
    (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers"),
]  # fmt: skip


def _compressed(message: Any, data: bytes | None = None) -> bytes:
    raw = gzip.compress(data if data is not None else message.SerializeToString())
    return struct.pack(">BI", 1, len(raw)) + raw


def _send_body(raw: RawClient, sid: int, body: bytes) -> None:
    for i in range(0, len(body), frames.MAX_FRAME):
        last = i + frames.MAX_FRAME >= len(body)
        raw.send(frames.DATA, frames.END_STREAM if last else 0, sid, body[i : i + frames.MAX_FRAME])


def test_a_compression_bomb_is_refused_early_and_a_second_closes_the_connection() -> None:
    """A message inflating past 100 times its size ends RESOURCE_EXHAUSTED
    after inflating at most that much (never the 64 MiB it would make); the
    second on a connection gets GOAWAY(ENHANCE_YOUR_CALM). Ordinary
    compressed requests, and one within the ratio but over the message limit,
    are answered as before."""
    running = Running(max_message_bytes=64 * 2**20)
    try:
        with RawClient(running.port) as raw:
            raw.open(1, "/backend.Backend/Predict", ("grpc-encoding", "gzip"))
            prompt = "compress me " * 1000  # 12 KB, 150 times smaller: under the 1 MiB floor
            _send_body(raw, 1, _compressed(pb.PredictOptions(Prompt=prompt)))
            assert ("grpc-status", "0") in raw.read_until_end(1)
            bomb = _compressed(None, bytes(64 * 2**20))  # ~64 KiB: 1,000 times
            for sid in (3, 5):
                raw.open(sid, "/backend.Backend/Predict", ("grpc-encoding", "gzip"))
                _send_body(raw, sid, bomb)
            headers = dict(raw.read_until_end(3))
            assert headers["grpc-status"] == "8", headers
            assert "compression bomb" in headers["grpc-message"], headers
            _kind, _flags, _sid, payload = raw.read_frame(lambda f: f[0] == frames.GOAWAY)
            assert int.from_bytes(payload[4:8], "big") == frames.ENHANCE_YOUR_CALM, payload
            assert payload[8:] == b"compression bombs"
    finally:
        running.close()
    small = Running(max_message_bytes=2**20)
    try:
        with RawClient(small.port) as raw:  # 2 MiB of text in ~8 KiB: within the ratio floor
            raw.open(1, "/backend.Backend/Predict", ("grpc-encoding", "gzip"))
            _send_body(raw, 1, _compressed(None, b"ab" * 2**20))
            headers = dict(raw.read_until_end(1))
            assert headers["grpc-status"] == "8", headers
            assert headers["grpc-message"] == "decompressed message larger than max", headers
    finally:
        small.close()


def test_inflating_yields_to_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large compressed message is inflated a step at a time with the loop
    running between steps: an 8 MiB request (at 256 KiB a step) is still
    inflating when another connection's Health is answered."""
    from backend.h2grpc import messages

    steps: list[int] = []
    original = messages.zlib.decompressobj

    class Counting:
        def __init__(self, wbits: int) -> None:
            self.inner = original(wbits)

        def decompress(self, data: bytes, max_length: int) -> bytes:
            out = self.inner.decompress(data, max_length)
            steps.append(len(out))
            return out

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    monkeypatch.setattr(messages.zlib, "decompressobj", Counting)
    running = Running(max_message_bytes=64 * 2**20)
    try:
        text = base64.b64encode(random.Random(0).randbytes(6 * 2**20)).decode()
        big = pb.PredictOptions(Prompt=text)  # 8 MiB, compressing ~1.3 times
        payload = gzip.compress(big.SerializeToString(), compresslevel=1)
        with RawClient(running.port) as raw, running.channel() as channel:
            stub = backend_pb2_grpc.BackendStub(channel)
            # PredictStream with Tokens 0 answers at once, without echoing the prompt.
            raw.open(1, "/backend.Backend/PredictStream", ("grpc-encoding", "gzip"))
            _send_body(raw, 1, struct.pack(">BI", 1, len(payload)) + payload)
            assert _wait(lambda: len(steps) >= 2)
            assert stub.Health(pb.HealthMessage(), timeout=10).message == b"OK"
            during = len(steps)
            headers = dict(raw.read_until_end(1))
        assert headers.get("grpc-status") == "0", headers
        assert max(steps) <= messages.INFLATE_STEP
        assert during < len(steps), (during, len(steps))  # Health came between the steps
    finally:
        running.close()


def test_header_limits_are_advertised_and_enforced(server: Running) -> None:
    """SETTINGS_MAX_HEADER_LIST_SIZE 16 KiB (C-core's); more than 64 fields is
    refused with RESOURCE_EXHAUSTED, the connection kept; a list beyond the
    advertised size closes the connection (ENHANCE_YOUR_CALM: the HPACK state
    is lost mid-block)."""
    with RawClient(server.port) as raw:
        _kind, _flags, _sid, payload = raw.read_frame(lambda f: f[0] == frames.SETTINGS)
        settings = dict(struct.iter_unpack(">HI", payload))
        assert settings[frames.S_MAX_HEADER_LIST_SIZE] == 16 * 1024
        many = tuple((f"x-{i}", "v") for i in range(64))
        raw.request(1, "/backend.Backend/Health", pb.HealthMessage(), *many)
        headers = dict(raw.read_until_end(1))
        assert headers["grpc-status"] == "8", headers
        assert "70 header fields, more than 64" in headers["grpc-message"], headers
        raw.request(3, "/backend.Backend/Health", pb.HealthMessage())
        assert ("grpc-status", "0") in raw.read_until_end(3)
        raw.request(5, "/backend.Backend/Health", pb.HealthMessage(), ("x-big", "v" * 17_000))
        _kind, _flags, _sid, payload = raw.read_frame(lambda f: f[0] == frames.GOAWAY)
        assert int.from_bytes(payload[4:8], "big") == frames.ENHANCE_YOUR_CALM, payload


def test_unfinished_requests_headers_are_bounded_per_worker_oldest_ended_first() -> None:
    """Requests whose HEADERS came but not their END_STREAM hold their decoded
    headers. Past the worker's budget the oldest such request is ended
    (RESOURCE_EXHAUSTED) to make room, so a new request is never refused for
    it; a complete request no longer counts."""
    running = Running()
    pool = running.server.header_bytes
    try:
        clients = [RawClient(running.port) for _ in range(3)]
        big = ("x-pad", "p" * 6000)
        clients[0].open(1, "/backend.Backend/Health", big)
        assert _wait(lambda: pool.held > 6000)
        pool.limit = 2 * pool.held + 100  # room for two such requests
        clients[1].open(1, "/backend.Backend/Health", big)
        assert _wait(lambda: len(pool.waiting) == 2)
        clients[2].open(1, "/backend.Backend/Health", big)  # the oldest goes
        headers = dict(clients[0].read_until_end(1))
        assert headers["grpc-status"] == "8", headers
        assert "budget for header bytes" in headers["grpc-message"], headers
        for raw in clients[1:]:  # the others complete and are served
            raw.send(frames.DATA, frames.END_STREAM, 1, grpc_message(pb.HealthMessage()))
            assert ("grpc-status", "0") in raw.read_until_end(1)
        assert _wait(lambda: pool.held == 0 and not pool.waiting), pool.held
        for raw in clients:
            raw.sock.close()
    finally:
        running.close()


def test_a_read_of_many_frames_is_handled_over_several_loop_turns(
    server: Running, stub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no time at all for a turn (TURN_S 0), every frame waits for its
    own loop turn: 2,000 requests sent in one write are still all answered,
    and another client is served meanwhile."""
    monkeypatch.setattr(pace, "TURN_S", 0.0)
    with RawClient(server.port) as raw:
        body = grpc_message(pb.HealthMessage())
        block = b""
        for sid in range(1, 4001, 2):  # hpack-indexed after the first
            fields = raw.encoder.encode(REQUEST_HEADERS)
            block += frames.frame(frames.HEADERS, frames.END_HEADERS, sid, fields)
            block += frames.frame(frames.DATA, frames.END_STREAM, sid, body)
        raw.sock.sendall(block)
        assert stub.Health(pb.HealthMessage(), timeout=10).message == b"OK"
        ended = 0
        while ended < 2000:
            kind, flags, _sid, _ = raw.read_frame()
            ended += kind == frames.HEADERS and bool(flags & frames.END_STREAM)
        assert server.servicer.health_calls >= 2001


def test_a_peer_that_never_reads_is_no_longer_read(server: Running) -> None:
    """50,000 Health requests, not a byte of the replies read: the server stops
    handling them once its replies back up (asyncio's pause_writing),
    including those it had read already. A server that went on would handle
    all 50,000 and queue their replies in memory."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    assert _wait(lambda: len(server.server.connections) == 1)
    try:
        encoder = hpack.Encoder()
        sock.sendall(frames.PREFACE + frames.frame(frames.SETTINGS, 0, 0))
        body = grpc_message(pb.HealthMessage())
        batch = b"".join(
            frames.frame(frames.HEADERS, frames.END_HEADERS, sid, encoder.encode(REQUEST_HEADERS))
            + frames.frame(frames.DATA, frames.END_STREAM, sid, body)
            for sid in range(1, 100_001, 2)
        )
        sock.setblocking(False)
        sent = 0
        conn = next(iter(server.server.connections))  # the test's own: the only one
        deadline = time.monotonic() + 60
        while "socket" not in conn.holds and time.monotonic() < deadline:
            try:
                sent += sock.send(batch[sent : sent + 65536])
            except BlockingIOError:
                time.sleep(0.01)
        assert "socket" in conn.holds, "the replies never backed up"
        handled = server.servicer.health_calls
        time.sleep(0.5)
        assert server.servicer.health_calls == handled  # it stopped, not slowed
        assert handled < 40_000, handled
    finally:
        sock.close()
