"""A gRPC server (HTTP/2, unary and server-streaming RPCs) on the event loop itself.

Why not grpc.aio: its C core runs HTTP/2 in its own threads and hands every
completed operation back to the event loop through a completion-queue poller,
so each streamed message costs two thread hops and ~100-280 µs of CPU in the
serving process (bench/floor.py measures it) — more than vLLM's whole front end
spends per token. Here a streamed token is one `transport.write` of a DATA
frame from the handler's own task: no threads, no hops, ~10-20 µs.

Scope, deliberately small (what a gRPC client needs from this worker):
  * h2c (cleartext HTTP/2 with prior knowledge, as grpc clients dial
    `insecure`), TCP or `unix:` sockets; no TLS (the worker listens on
    loopback unless told otherwise).
  * unary and server-streaming methods, one request message per call;
    requests compressed with gzip/deflate are accepted, replies are sent
    uncompressed (allowed by the gRPC spec whatever the client accepts).
  * HTTP/2 flow control both ways, SETTINGS, PING (ACKs paced to one per
    50 ms, see PING_ACK_INTERVAL), RST_STREAM -> the handler task is
    cancelled (and with it the engine request), GOAWAY on shutdown,
    CONTINUATION, padding, grpc-timeout deadlines, keepalive pings to find a
    vanished peer, a cap on concurrent streams and on message size.
HPACK decoding uses the `hpack` package (the python-hyper one); replies only
send literal headers, so our encoder needs no dynamic table.

Handlers keep grpc.aio's signature `(request, context)`: `context.write`,
`context.abort(grpc.StatusCode, details)`, `context.invocation_metadata()`,
`context.cancelled()`, `context.peer()`, `context.time_remaining()`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import socket
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import hpack
from google.protobuf.message import DecodeError, Message

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
# Flags.
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# Error codes.
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB
# Settings.
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
# What we let a client send before it must wait for our WINDOW_UPDATE. Request
# messages are small except images/LoadModel; 4 MiB windows keep a large one
# from stalling on round trips.
RECV_WINDOW = 4 * 1024 * 1024
MAX_HEADER_LIST = 64 * 1024
# At most one PING ACK per this many seconds per connection; later pings are
# answered together when it has passed. grpc-go's BDP estimator (on in the
# gateway's default dial) sends a new ping with the first DATA frame after each
# ACK, i.e. one per streamed token when tokens are slower than the round trip;
# answering each at once makes every token cost a second wake-up here. With a
# 50 ms pace a client pings at most 20 times a second, and keepalive pings
# (seconds apart) are still answered at once.
PING_ACK_INTERVAL = 0.05
# Frames that cost work but carry no request forward (SETTINGS, PRIORITY,
# WINDOW_UPDATE, empty DATA or CONTINUATION, unknown types, a client's
# RST_STREAM: the rapid-reset attack) are counted per connection: more than
# ABUSE_LIMIT of them within ABUSE_WINDOW seconds is a flood, answered with
# GOAWAY(ENHANCE_YOUR_CALM) as nghttp2, grpc-go and C-core do. A well-behaved
# client sends a few hundred a second at most (grpc-go's WINDOW_UPDATEs at 256
# streams), so this bounds the loop time one connection can take.
ABUSE_LIMIT = 2000
ABUSE_WINDOW = 1.0
# Ended streams remembered per connection, for what the peer may still send on
# them: DATA in flight up to the window it had (beyond: FLOW_CONTROL_ERROR),
# nothing after its own END_STREAM or RST_STREAM (STREAM_CLOSED).
GONE_REMEMBERED = 1024
# See _Connection._idle_check.
IDLE_CLOSE_GRACE = 1.0
# At most one warning per this many seconds about connections over the cap.
REFUSAL_LOG_INTERVAL = 10.0

_GRPC_PREFIX = struct.Struct(">BI")

# Pre-encoded HPACK: ":status: 200" is static-table entry 8 (0x88);
# content-type is static name 31, a literal without indexing.
_CT = b"application/grpc"
_RESPONSE_HEADERS = b"\x88\x0f\x10" + bytes([len(_CT)]) + _CT


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _percent_encode(text: str) -> bytes:
    out = bytearray()
    for b in text.encode("utf-8", "replace"):
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def _trailer_block(code: int, details: str, trailers_only: bool) -> bytes:
    block = _RESPONSE_HEADERS if trailers_only else b""
    block += _literal(b"grpc-status", str(code).encode())
    if details:
        block += _literal(b"grpc-message", _percent_encode(details))
    return block


_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_timeout(value: bytes) -> float | None:
    """grpc-timeout ("<1-8 digits><unit>") in seconds, None when malformed."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


class AbortError(grpc.aio.AbortError):
    """Raised by `context.abort`; ends the RPC with its status. A grpc.aio
    AbortError, so handler code written for grpc.aio (servicer._unary lets
    those through untouched) treats both transports' aborts alike."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class ConnectionError_(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True, slots=True)
class Method:
    handler: Callable[[Any, Context], Awaitable[Any]]
    request_type: type[Message]
    streaming: bool


def methods_of(servicer: Any, service: Any) -> dict[str, Method]:
    """`/package.Service/Method` -> Method for every method `servicer` defines,
    from the service's protobuf descriptor (`backend_pb2.DESCRIPTOR.services_by_name[...]`)."""
    from google.protobuf import message_factory

    table = {}
    for m in service.methods:
        if m.client_streaming:
            continue  # not served by this transport (the worker has none)
        handler = getattr(servicer, m.name, None)
        if handler is None:
            continue
        request_type = message_factory.GetMessageClass(m.input_type)
        table[f"/{service.full_name}/{m.name}"] = Method(handler, request_type, m.server_streaming)
    return table


class Context:
    """What a handler sees of its call (grpc.aio's ServicerContext, the parts we use)."""

    __slots__ = ("_metadata", "_stream")

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream
        self._metadata: tuple[tuple[str, str | bytes], ...] | None = None

    async def write(self, message: Message) -> None:
        stream = self._stream
        if stream.done:
            raise asyncio.CancelledError()
        data = message.SerializeToString()
        await stream.conn.send_message(stream, _GRPC_PREFIX.pack(0, len(data)) + data)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise AbortError(code.value[0], details)

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        if self._metadata is None:
            items: list[tuple[str, str | bytes]] = []
            for key, value in self._stream.headers:
                if key.startswith(b":") or key in (b"te", b"content-type", b"grpc-timeout"):
                    continue
                name = key.decode("latin-1")
                if name.endswith("-bin"):
                    items.append((name, base64.b64decode(value + b"==")))
                else:
                    items.append((name, value.decode("latin-1")))
            self._metadata = tuple(items)
        return self._metadata

    def cancelled(self) -> bool:
        return self._stream.done

    def peer(self) -> str:
        return self._stream.conn.peer

    def time_remaining(self) -> float | None:
        deadline = self._stream.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())


class _Stream:
    __slots__ = (
        "after",
        "body",
        "cancel_status",
        "conn",
        "deadline",
        "done",
        "drained",
        "encoding",
        "headers",
        "headers_sent",
        "id",
        "method",
        "need",
        "pending",
        "recv_window",
        "remote_closed",
        "send_window",
        "task",
        "timer",
    )

    def __init__(self, stream_id: int, conn: _Connection, send_window: int) -> None:
        self.id = stream_id
        self.conn = conn
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.remote_closed = False
        self.done = False  # our side ended (trailers or reset sent, or reset received)
        self.task: asyncio.Task[None] | None = None
        self.send_window = send_window
        self.headers_sent = False
        self.pending = bytearray()  # DATA payload waiting for flow-control window
        self.drained: asyncio.Future[None] | None = None
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.encoding = b"identity"
        # (code, details) to send when the task is cancelled by us (deadline,
        # shutdown); None: cancelled because the peer went away.
        self.cancel_status: tuple[int, str] | None = None
        self.method: Method | None = None
        self.recv_window = RECV_WINDOW  # what the peer may still send (our SETTINGS)
        # Request bytes still to come once the message's prefix has told its
        # size (None before): reserved in the connection window, see _admit.
        self.need: int | None = None
        self.after = b""  # trailers waiting for `pending` to leave


class _Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []  # frames queued for this loop iteration's write
        self.flush_scheduled = False
        self.buffer = bytearray()
        self.preface_seen = False
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self.streams: dict[int, _Stream] = {}
        self.blocked: dict[int, _Stream] = {}  # streams with data waiting for window
        self.last_stream_id = 0
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = 16_384
        self.header_stream = 0  # stream id whose header block is being continued
        self.header_block = bytearray()
        self.header_flags = 0
        self.paused: asyncio.Future[None] | None = None
        self.closing = False
        self.goaway_sent = False
        self.peer = ""
        self.last_activity = time.monotonic()
        self.ping_outstanding = False
        self.keepalive: asyncio.TimerHandle | None = None
        self.last_ping_ack = -PING_ACK_INTERVAL
        self.ping_payloads: list[bytes] = []  # PINGs waiting for their ACK
        self.ping_timer: asyncio.TimerHandle | None = None
        self.preface_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_since = time.monotonic()  # when the last stream ended
        self.abuse = 0
        self.abuse_since = time.monotonic()
        self.recv_window = RECV_WINDOW  # the connection window the peer has left
        self.returned = 0  # window due back to the peer, sent in batches (_give_back)
        self.buffered = 0  # request bytes held in stream bodies
        self.owed = 0  # sum of the open streams' `need`
        self.gone: dict[int, int] = {}  # see GONE_REMEMBERED; -1: the peer had ended it

    # ---- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass
            if isinstance(peer, tuple):
                family = "ipv6" if sock.family == socket.AF_INET6 else "ipv4"
                self.peer = f"{family}:{peer[0]}:{peer[1]}"
        else:
            self.peer = f"unix:{peer or ''}"
        server = self.server
        if server.max_connections and len(server.connections) >= server.max_connections:
            self._refuse()
            return
        settings = struct.pack(
            ">HIHIHIHI",
            S_MAX_CONCURRENT_STREAMS, self.server.max_concurrent_streams,
            S_INITIAL_WINDOW_SIZE, RECV_WINDOW,
            S_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST,
            S_ENABLE_PUSH, 0,
        )  # fmt: skip
        self._write(
            _frame(SETTINGS, 0, 0, settings)
            + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", RECV_WINDOW - DEFAULT_WINDOW))
        )
        server.connections.add(self)
        self._schedule_keepalive()
        loop = asyncio.get_running_loop()
        self.preface_timer = loop.call_later(server.handshake_timeout, self._preface_expired)
        if server.idle_timeout > 0:
            self.idle_timer = loop.call_later(server.idle_timeout, self._idle_check)

    def _refuse(self) -> None:
        """Over the server's connection cap: close at once, saying why."""
        server = self.server
        server.refused_connections += 1
        now = time.monotonic()
        if now - server.refusal_logged >= REFUSAL_LOG_INTERVAL:
            server.refusal_logged = now
            log.warning(
                "%d connections open (the cap): closing new ones (%d so far), latest from %s",
                len(server.connections),
                server.refused_connections,
                self.peer,
            )
        goaway = struct.pack(">II", 0, ENHANCE_YOUR_CALM) + b"too many connections"
        self._write(_frame(SETTINGS, 0, 0) + _frame(GOAWAY, 0, 0, goaway))
        self.close()

    def _drop(self, stream_id: int) -> _Stream | None:
        stream = self.streams.pop(stream_id, None)
        if not self.streams:
            self.idle_since = time.monotonic()
        return stream

    def _idle_check(self) -> None:
        """GOAWAY(NO_ERROR) to a connection without streams for idle_timeout
        (grpc-go's MaxConnectionIdle), closed IDLE_CLOSE_GRACE later: a stream
        the peer opens meanwhile is refused (REFUSED_STREAM, which gRPC clients
        retry on a new connection), and the peer has time to read the GOAWAY
        before the close."""
        self.idle_timer = None
        if self.closing:
            return
        loop = asyncio.get_running_loop()
        timeout = self.server.idle_timeout
        left = timeout - (time.monotonic() - self.idle_since)
        if self.streams or left > 0:
            self.idle_timer = loop.call_later(left if left > 0 else timeout, self._idle_check)
            return
        log.info("closing HTTP/2 connection from %s: idle for %.0f s", self.peer, timeout)
        self.goaway()
        self.idle_timer = loop.call_later(IDLE_CLOSE_GRACE, self.close)

    def _preface_expired(self) -> None:
        self.preface_timer = None
        if not self.preface_seen:
            log.warning("closing connection from %s: no HTTP/2 preface in time", self.peer)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        if self.keepalive is not None:
            self.keepalive.cancel()
        if self.ping_timer is not None:
            self.ping_timer.cancel()
        if self.preface_timer is not None:
            self.preface_timer.cancel()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        for stream in list(self.streams.values()):
            self._cancel(stream, None)
        self.streams.clear()
        self.blocked.clear()
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)

    def pause_writing(self) -> None:
        if self.paused is None or self.paused.done():
            self.paused = asyncio.get_running_loop().create_future()
        # A peer that does not read its replies gets no more requests read
        # (and answered) until it does: what we queue for it stays bounded.
        if self.transport is not None and not self.closing:
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)
        if self.transport is not None and not self.closing:
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        buf = self.buffer
        buf += data
        try:
            if not self.preface_seen:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                    return
                if buf[: len(PREFACE)] != PREFACE:
                    raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                del buf[: len(PREFACE)]
                self.preface_seen = True
            pos = 0
            end = len(buf)
            while end - pos >= 9:
                length = int.from_bytes(buf[pos : pos + 3], "big")
                if length > 16_384:  # our SETTINGS_MAX_FRAME_SIZE (the default)
                    raise ConnectionError_(FRAME_SIZE_ERROR, "frame larger than 16384 bytes")
                if end - pos < 9 + length:
                    break
                kind = buf[pos + 3]
                flags = buf[pos + 4]
                stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                payload = bytes(buf[pos + 9 : pos + 9 + length])
                pos += 9 + length
                self._frame_received(kind, flags, stream_id, payload)
                if self.closing:
                    return
            del buf[:pos]
        except ConnectionError_ as exc:
            self._connection_error(exc.code, str(exc))
        except Exception:  # a bug here must not leave the connection half-parsed
            log.exception("HTTP/2 frame handling failed")
            self._connection_error(INTERNAL_ERROR, "internal error")

    # ---- frames in -----------------------------------------------------------

    def _charge(self) -> None:
        """Count one frame that does no work for a request (see ABUSE_LIMIT)."""
        self.abuse += 1
        if self.abuse > ABUSE_LIMIT:
            now = time.monotonic()
            if now - self.abuse_since < ABUSE_WINDOW:
                raise ConnectionError_(ENHANCE_YOUR_CALM, "flood of control or empty frames")
            self.abuse = 1
            self.abuse_since = now

    def _frame_received(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.header_stream and kind != CONTINUATION:
            raise ConnectionError_(PROTOCOL_ERROR, "expected CONTINUATION")
        if (kind in (SETTINGS, WINDOW_UPDATE, PRIORITY, RST_STREAM) or kind > CONTINUATION) or (
            not payload and kind in (DATA, CONTINUATION) and not flags & END_STREAM
        ):
            self._charge()
        if kind == DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif kind == CONTINUATION:
            if stream_id == 0 or stream_id != self.header_stream:
                raise ConnectionError_(PROTOCOL_ERROR, "unexpected CONTINUATION")
            self.header_block += payload
            if len(self.header_block) > MAX_HEADER_LIST * 2:
                raise ConnectionError_(ENHANCE_YOUR_CALM, "header block too large")
            if flags & END_HEADERS:
                self._headers_complete(stream_id, self.header_flags, bytes(self.header_block))
        elif kind == SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == PING:
            if len(payload) != 8 or stream_id:
                raise ConnectionError_(FRAME_SIZE_ERROR, "bad PING")
            if flags & ACK:
                self.ping_outstanding = False
            else:
                self._on_ping(payload)
        elif kind == RST_STREAM:
            if stream_id == 0 or len(payload) != 4:
                raise ConnectionError_(PROTOCOL_ERROR, "bad RST_STREAM")
            if stream_id > self.last_stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            stream = self._drop(stream_id)
            self.blocked.pop(stream_id, None)
            if stream is not None:
                self._cancel(stream, None)
                stream.remote_closed = True  # nothing more may come on it
                self._forget(stream)
        elif kind == GOAWAY:
            pass  # the client stops opening streams; the open ones finish
        elif kind == PRIORITY:
            pass
        elif kind == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # unknown frame types are ignored (RFC 9113 §4.1)

    def _on_ping(self, payload: bytes) -> None:
        now = time.monotonic()
        if self.ping_timer is None and now - self.last_ping_ack >= PING_ACK_INTERVAL:
            self.last_ping_ack = now
            self._write(_frame(PING, ACK, 0, payload))
            return
        if len(self.ping_payloads) >= 100:
            raise ConnectionError_(ENHANCE_YOUR_CALM, "too many unanswered pings")
        self.ping_payloads.append(payload)
        if self.ping_timer is None:
            delay = self.last_ping_ack + PING_ACK_INTERVAL - now
            self.ping_timer = asyncio.get_running_loop().call_later(delay, self._ack_pings)

    def _ack_pings(self) -> None:
        self.ping_timer = None
        self.last_ping_ack = time.monotonic()
        self._write(b"".join(_frame(PING, ACK, 0, p) for p in self.ping_payloads))
        self.ping_payloads.clear()

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, "bad SETTINGS length")
        for off in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, off)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == S_MAX_FRAME_SIZE:
                if not 16_384 <= value <= 16_777_215:
                    raise ConnectionError_(PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self.peer_max_frame = value
        self._write(_frame(SETTINGS, ACK, 0))
        self._flush_pending()

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise ConnectionError_(PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "connection window overflow")
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                if stream_id > self.last_stream_id:
                    raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
                return
            if stream.send_window + increment > MAX_WINDOW:
                self._reset(stream, FLOW_CONTROL_ERROR)  # RFC 9113 §6.9.1
                return
            stream.send_window += increment
        self._flush_pending()

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or not stream_id & 1:
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on an invalid stream id")
        pad = 0
        start = 0
        if flags & PADDED:
            if not payload:
                raise ConnectionError_(FRAME_SIZE_ERROR, "PADDED HEADERS without a pad length")
            pad = payload[0]
            start = 1
        if flags & PRIORITY_FLAG:
            start += 5
        if start + pad > len(payload):
            raise ConnectionError_(PROTOCOL_ERROR, "bad HEADERS padding")
        block = payload[start : len(payload) - pad]
        if flags & END_HEADERS:
            self._headers_complete(stream_id, flags, block)
        else:
            self.header_stream = stream_id
            self.header_flags = flags
            self.header_block = bytearray(block)

    def _headers_complete(self, stream_id: int, flags: int, block: bytes) -> None:
        self.header_stream = 0
        self.header_block = bytearray()
        try:
            headers = self.decoder.decode(block, raw=True)
        except Exception as exc:  # hpack's errors: the connection's table is now unusable
            raise ConnectionError_(COMPRESSION_ERROR, f"bad header block: {exc}") from None
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client: only END_STREAM matters
            if flags & END_STREAM:
                self._remote_end(stream)
            return
        if stream_id <= self.last_stream_id:
            left = self.gone.get(stream_id)
            if left is None:  # never opened: ids must grow (RFC 9113 §5.1.1)
                raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on a lower stream id")
            if left < 0:
                raise ConnectionError_(STREAM_CLOSED, "HEADERS after the stream ended")
            return  # trailers racing our reset of the stream
        self.last_stream_id = stream_id
        if self.goaway_sent or self.server.stopping:
            self._write(_frame(RST_STREAM, 0, stream_id, REFUSED_STREAM.to_bytes(4, "big")))
            return
        if len(self.streams) >= self.server.max_concurrent_streams:
            self._write(_frame(RST_STREAM, 0, stream_id, REFUSED_STREAM.to_bytes(4, "big")))
            return
        stream = _Stream(stream_id, self, self.peer_initial_window)
        stream.headers = [(bytes(k), bytes(v)) for k, v in headers]
        self.streams[stream_id] = stream
        self._start(stream)
        if flags & END_STREAM and not stream.done:
            self._remote_end(stream)

    def _start(self, stream: _Stream) -> None:
        """Validate the request headers; errors end the stream at once."""
        path = method = content_type = b""
        te = b"trailers"
        auth = None
        for key, value in stream.headers:
            if key == b":path":
                path = value
            elif key == b":method":
                method = value
            elif key == b"content-type":
                content_type = value
            elif key == b"te":
                te = value
            elif key == b"grpc-timeout":
                timeout = parse_timeout(value)
                if timeout is not None:
                    stream.deadline = time.monotonic() + timeout
            elif key == b"grpc-encoding":
                stream.encoding = value
            elif key == b"authorization":
                auth = value
        if te != b"trailers":  # RFC 9113 §8.2.2: a malformed request
            self._reset(stream, PROTOCOL_ERROR)
            return
        grpc_type = content_type == _CT or content_type.startswith(
            (b"application/grpc+", b"application/grpc;")
        )
        if method != b"POST" or not grpc_type:
            # Not a gRPC request (RFC: answer 415 for a wrong content type).
            block = b"\x00" + _hpack_int(7, 7) + b":status" + _hpack_int(3, 7) + b"415"
            self._end(stream, _frame(HEADERS, END_HEADERS | END_STREAM, stream.id, block))
            return
        server = self.server
        if (
            server.auth is not None
            and not path.startswith(server.auth_exempt)
            and not hmac.compare_digest(auth or b"", server.auth)
        ):
            self._finish(stream, 16, "missing or invalid authorization bearer token")
            return
        target = server.methods.get(path.decode("latin-1"))
        if target is None:
            # The path is the peer's (up to the header list limit): echo a
            # bounded prefix, or each refusal costs a copy of it both ways.
            self._finish(stream, 12, f"Method not found: {path[:200].decode('latin-1')}")
            return
        if stream.encoding not in (b"identity", b"gzip", b"deflate"):
            self._finish(stream, 12, f"unsupported grpc-encoding {stream.encoding.decode()!r}")
            return
        stream.method = target
        if stream.deadline is not None:
            delay = max(0.0, stream.deadline - time.monotonic())
            stream.timer = asyncio.get_running_loop().call_later(delay, self._expire, stream)

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)  # flow-controlled: padding counts
        if flags & PADDED:
            if not payload or payload[0] >= size:
                raise ConnectionError_(PROTOCOL_ERROR, "bad DATA padding")
            payload = payload[1 : size - payload[0]]
        # Inbound flow control (RFC 9113 §6.9): window goes back for bytes we
        # do not keep at once, for bytes we keep when their message goes to
        # its handler (_remote_end), so what a peer can make us hold is what
        # we granted (see _admit).
        self.recv_window -= size
        if self.recv_window < 0:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        stream = self.streams.get(stream_id)
        if stream is None or stream.done:
            if stream_id > self.last_stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, "DATA on an idle stream")
            left = self.gone.get(stream_id)
            if left is not None:
                if left < 0:
                    raise ConnectionError_(STREAM_CLOSED, "DATA after the stream ended")
                if left < size:
                    raise ConnectionError_(
                        FLOW_CONTROL_ERROR, "DATA beyond a closed stream's window"
                    )
                self.gone[stream_id] = left - size
            self._give_back(size)
            return
        if stream.remote_closed:  # half-closed (remote): RFC 9113 §5.1
            self._give_back(size)
            self._reset(stream, STREAM_CLOSED)
            return
        stream.recv_window -= size
        if stream.recv_window < 0:
            self._give_back(size)
            self._reset(stream, FLOW_CONTROL_ERROR)
            return
        self._give_back(size - len(payload))  # the padding
        body = stream.body
        body += payload
        self.buffered += len(payload)
        if stream.need is not None:
            stream.need -= len(payload)
            self.owed -= len(payload)
            if stream.need < 0:  # a unary call carries one message
                self._finish(stream, 13, "the request must be exactly one message")
                return
        elif len(body) >= 5 and not self._admit(stream):
            return
        if flags & END_STREAM:
            self._remote_end(stream)

    def _admit(self, stream: _Stream) -> bool:
        """The message's prefix has arrived: reserve window for the rest of it,
        or end the stream (too large, or the connection holds too much).

        Every admitted message must be able to complete whatever order the
        peer sends its streams' frames in (grpc clients interleave them in
        16 KiB frames): otherwise half-received messages could use up the
        connection window and wait for each other forever. So the connection
        window is kept at least the sum of what admitted messages still need
        (`owed`), and a message is admitted only while what is held plus what
        is owed stays within server.max_buffered: the bound on what one
        connection can make us hold, enforced by flow control itself."""
        body = stream.body
        declared = int.from_bytes(body[1:5], "big")
        limit = self.server.max_message_bytes
        if declared > limit:
            self._finish(stream, 8, f"Received message larger than max ({declared} vs. {limit})")
            return False
        need = 5 + declared - len(body)
        if need < 0:
            self._finish(stream, 13, "the request must be exactly one message")
            return False
        if self.buffered + self.owed + need > self.server.max_buffered:
            self._finish(stream, 8, "too many request bytes waiting on this connection")
            return False
        stream.need = need
        self.owed += need
        if need > stream.recv_window:  # a message larger than the initial window
            grant = need - stream.recv_window
            self._write(_frame(WINDOW_UPDATE, 0, stream.id, grant.to_bytes(4, "big")))
            stream.recv_window = need
        self._give_back(0)
        return True

    def _give_back(self, size: int) -> None:
        """`size` bytes of connection window are due back to the peer (bytes not
        kept, or handed to a handler); sent in batches of half the window, or
        at once when the window no longer covers what admitted messages need."""
        self.returned += size
        short = self.owed - self.recv_window - self.returned
        if short > 0:
            self.returned += short
        if short > 0 or self.returned >= RECV_WINDOW // 2:
            self._write(_frame(WINDOW_UPDATE, 0, 0, self.returned.to_bytes(4, "big")))
            self.recv_window += self.returned
            self.returned = 0

    def _forget(self, stream: _Stream) -> None:
        """The stream ended: free its body, remember what the peer may still send."""
        self.buffered -= len(stream.body)
        if stream.need is not None:
            self.owed -= stream.need
            stream.need = 0
        self._give_back(len(stream.body))
        stream.body = bytearray()
        gone = self.gone
        gone[stream.id] = -1 if stream.remote_closed else max(0, stream.recv_window)
        if len(gone) > GONE_REMEMBERED:
            del gone[next(iter(gone))]

    def _remote_end(self, stream: _Stream) -> None:
        """The request is complete: decode it and run the handler."""
        stream.remote_closed = True
        if stream.done or stream.task is not None:
            return
        target = stream.method
        if target is None:
            return
        body = stream.body
        if len(body) < 5:
            self._finish(stream, 13, "the request carries no message")
            return
        compressed, length = _GRPC_PREFIX.unpack_from(body)
        if len(body) != 5 + length:
            self._finish(stream, 13, "the request must be exactly one message")
            return
        raw = bytes(body[5:])
        self.buffered -= len(body)
        self._give_back(len(body))  # the message is the handler's now
        stream.body = bytearray()
        try:
            if compressed:
                if stream.encoding == b"identity":
                    raise ValueError("compressed message without grpc-encoding")
                wbits = 31 if stream.encoding == b"gzip" else 15
                decomp = zlib.decompressobj(wbits)
                raw = decomp.decompress(raw, self.server.max_message_bytes + 1)
                if len(raw) > self.server.max_message_bytes or decomp.unconsumed_tail:
                    self._finish(stream, 8, "decompressed message larger than max")
                    return
            request = target.request_type.FromString(raw)
        except (DecodeError, ValueError, zlib.error) as exc:
            # Protobuf refuses invalid UTF-8 in a string field with the same
            # generic error as a malformed message, so both are named.
            name = target.request_type.DESCRIPTOR.full_name
            self._finish(
                stream,
                3,
                f"cannot decode the request as {name}: malformed protobuf, or a string "
                f"field that is not valid UTF-8 ({exc})",
            )
            return
        stream.task = task = asyncio.get_running_loop().create_task(
            self._run(stream, target, request)
        )
        # The loop keeps only weak references to tasks.
        self.server.tasks[task] = stream
        task.add_done_callback(self.server.tasks.pop)

    # ---- running a call --------------------------------------------------------

    async def _run(self, stream: _Stream, target: Method, request: Message) -> None:
        context = Context(stream)
        try:
            result = await target.handler(request, context)
            if stream.done:
                return
            if not target.streaming:
                if result is None:
                    self._finish(stream, 13, "the handler returned no reply")
                    return
                data = result.SerializeToString()
                await self.send_message(stream, _GRPC_PREFIX.pack(0, len(data)) + data)
            self._finish(stream, 0, "")
        except AbortError as exc:
            self._finish(stream, exc.code, exc.details)
        except asyncio.CancelledError:
            if stream.cancel_status is not None and not stream.done:
                self._finish(stream, *stream.cancel_status)
            # else: the peer reset the stream or left; nobody to tell
        except Exception as exc:
            log.exception("unhandled error in %s", target.handler.__name__)
            self._finish(stream, 2, f"Unexpected {type(exc).__name__}")

    def _expire(self, stream: _Stream) -> None:
        stream.timer = None
        if not stream.done:
            self._cancel(stream, (4, "Deadline Exceeded"))
            if stream.task is None:
                self._finish(stream, 4, "Deadline Exceeded")

    def _cancel(self, stream: _Stream, status: tuple[int, str] | None) -> None:
        """Cancel the handler; `status` is sent if we cancel (None: the peer left)."""
        if status is None:
            stream.done = True
        stream.cancel_status = status
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        if stream.drained is not None and not stream.drained.done():
            stream.drained.set_result(None)
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    # ---- frames out ------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Queue `data`; everything queued in one event-loop iteration leaves in
        one socket write. At concurrency N one engine step wakes N streams, and
        their N messages then cost one syscall instead of N."""
        if self.transport is None or self.closing:
            return
        self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.out and self.transport is not None and not self.closing:
            self.transport.write(b"".join(self.out) if len(self.out) > 1 else self.out[0])
        self.out.clear()

    async def send_message(self, stream: _Stream, payload: bytes) -> None:
        """One length-prefixed gRPC message as DATA (headers first if not yet sent),
        waiting for flow-control window or a slow socket as needed."""
        head = b""
        if not stream.headers_sent:
            stream.headers_sent = True
            head = _frame(HEADERS, END_HEADERS, stream.id, _RESPONSE_HEADERS)
        size = len(payload)
        if not stream.pending and size <= self.send_window and size <= stream.send_window:
            self.send_window -= size
            stream.send_window -= size
            if size <= self.peer_max_frame:
                self._write(head + _frame(DATA, 0, stream.id, payload))
            else:
                self._write(head + self._data_frames(stream.id, payload))
        else:
            if head:
                self._write(head)
            stream.pending += payload
            self.blocked[stream.id] = stream
            self._flush_pending()
        while stream.pending and not stream.done:
            stream.drained = asyncio.get_running_loop().create_future()
            await stream.drained
        if stream.done:
            raise asyncio.CancelledError()
        if self.paused is not None and not self.paused.done():
            await self.paused

    def _data_frames(self, stream_id: int, payload: bytes) -> bytes:
        step = self.peer_max_frame
        return b"".join(
            _frame(DATA, 0, stream_id, payload[i : i + step]) for i in range(0, len(payload), step)
        )

    def _flush_pending(self) -> None:
        for stream in list(self.blocked.values()):
            if self.send_window <= 0:
                return
            size = min(len(stream.pending), self.send_window, stream.send_window)
            if size <= 0:
                continue
            chunk = bytes(stream.pending[:size])
            del stream.pending[:size]
            self.send_window -= size
            stream.send_window -= size
            self._write(self._data_frames(stream.id, chunk))
            if stream.pending:
                continue
            del self.blocked[stream.id]
            if stream.drained is not None and not stream.drained.done():
                stream.drained.set_result(None)
            if stream.after:  # the status the handler already gave
                self._write(stream.after)
                stream.after = b""
                self._drop(stream.id)

    def _finish(self, stream: _Stream, code: int, details: str) -> None:
        """Send the status (trailers, or trailers-only when nothing was sent)."""
        if stream.done:
            return
        trailers_only = not stream.headers_sent
        stream.headers_sent = True
        block = _trailer_block(code, details, trailers_only)
        out = _frame(HEADERS, END_HEADERS | END_STREAM, stream.id, block)
        if not stream.remote_closed:
            # We answered before the request was complete: stop the upload.
            out += _frame(RST_STREAM, 0, stream.id, NO_ERROR.to_bytes(4, "big"))
        self._end(stream, out)

    def _reset(self, stream: _Stream, code: int) -> None:
        """End the stream with RST_STREAM(code), dropping what it still had to send."""
        stream.pending = bytearray()
        stream.after = b""
        self.blocked.pop(stream.id, None)
        self._end(stream, _frame(RST_STREAM, 0, stream.id, code.to_bytes(4, "big")))

    def _end(self, stream: _Stream, data: bytes) -> None:
        stream.done = True
        self._forget(stream)
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        if stream.pending:
            # The status follows the data still waiting for window.
            stream.after = data
        else:
            self._drop(stream.id)
            self._write(data)
        if stream.task is not None and not stream.task.done() and stream.task is not _current():
            stream.task.cancel()

    def goaway(self) -> None:
        if not self.goaway_sent:
            self.goaway_sent = True
            self._write(_frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream_id, NO_ERROR)))

    def _connection_error(self, code: int, reason: str) -> None:
        log.warning("closing HTTP/2 connection from %s: %s", self.peer, reason)
        self._write(
            _frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream_id, code) + reason.encode())
        )
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closing:
            self._flush()
            self.closing = True
            self.transport.close()

    # ---- keepalive -------------------------------------------------------------

    def _schedule_keepalive(self) -> None:
        if self.server.keepalive_time > 0 and not self.closing:
            loop = asyncio.get_running_loop()
            self.keepalive = loop.call_later(self.server.keepalive_time, self._keepalive_check)

    def _keepalive_check(self) -> None:
        if self.closing:
            return
        idle = time.monotonic() - self.last_activity
        if self.ping_outstanding and idle >= self.server.keepalive_timeout:
            log.info("peer %s did not answer a keepalive ping: closing", self.peer)
            self.close()  # connection_lost follows and cancels the calls
            return
        if idle >= self.server.keepalive_time and not self.ping_outstanding:
            self.ping_outstanding = True
            self._write(_frame(PING, 0, 0, b"keepaliv"))
            loop = asyncio.get_running_loop()
            self.keepalive = loop.call_later(self.server.keepalive_timeout, self._keepalive_check)
            return
        self._schedule_keepalive()


def _current() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


class Server:
    """Serves `methods` (see `methods_of`) on one or more addresses."""

    def __init__(
        self,
        methods: dict[str, Method],
        *,
        auth_token: str | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
        max_concurrent_streams: int = 1000,
        keepalive_time: float = 30.0,
        keepalive_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        idle_timeout: float = 0.0,
        max_connections: int = 0,
        auth_exempt: tuple[str, ...] = (),
    ) -> None:
        self.methods = methods
        self.auth = f"Bearer {auth_token}".encode() if auth_token else None
        # Path prefixes served without the token (the standard health service).
        self.auth_exempt = tuple(p.encode() for p in auth_exempt)
        self.max_message_bytes = max_message_bytes
        # Request bytes one connection may have waiting in unfinished calls.
        self.max_buffered = max_message_bytes + RECV_WINDOW
        self.max_concurrent_streams = max_concurrent_streams
        self.keepalive_time = keepalive_time
        self.keepalive_timeout = keepalive_timeout
        self.handshake_timeout = handshake_timeout  # for the client preface
        self.idle_timeout = idle_timeout  # no open stream that long: GOAWAY, close (0: never)
        self.max_connections = max_connections  # beyond: closed on arrival (0: no cap)
        self.refused_connections = 0
        self.refusal_logged = -REFUSAL_LOG_INTERVAL
        self.connections: set[_Connection] = set()
        self.listeners: list[asyncio.Server] = []
        self.stopping = False
        self.tasks: dict[asyncio.Task[None], _Stream] = {}

    async def listen(self, addr: str) -> int:
        """Bind `host:port`, `[v6]:port` or `unix:/path`; returns the bound port (0 for unix)."""
        loop = asyncio.get_running_loop()
        if addr.startswith("unix:"):
            path = addr[5:].removeprefix("//")
            server = await loop.create_unix_server(lambda: _Connection(self), path)
            self.listeners.append(server)
            return 0
        host, sep, port_text = addr.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"{addr!r} is not HOST:PORT")
        host = host.strip("[]") or None  # type: ignore[assignment]
        server = await loop.create_server(
            lambda: _Connection(self), host, int(port_text), reuse_address=True, backlog=1024
        )
        self.listeners.append(server)
        sockets = server.sockets or ()
        return int(sockets[0].getsockname()[1]) if sockets else int(port_text)

    async def stop(self, grace: float) -> None:
        """Refuse new calls, let running ones finish for `grace` seconds, then
        end the rest with UNAVAILABLE (their handlers are cancelled)."""
        self.stopping = True
        for listener in self.listeners:
            listener.close()
        for conn in list(self.connections):
            conn.goaway()
        if self.tasks:
            _, late = await asyncio.wait(list(self.tasks), timeout=grace)
            for task in late:
                stream = self.tasks.get(task)
                if stream is not None:
                    stream.conn._cancel(stream, (14, "Cancelling all calls"))
            if late:
                await asyncio.wait(late, timeout=5.0)
        for conn in list(self.connections):
            conn.close()
        for listener in self.listeners:
            await listener.wait_closed()
