"""One client connection: HTTP/2 frames in, read at a bounded pace, handed
to the layers below (flow control, header blocks, the stream table), and the
connection's own end (GOAWAY, linger, eviction).

What a stream carries (a gRPC call) is the layer above's: the connection tells
it, through `CallEvents`, that a request's headers came and that the request is
complete; the call ends its stream through `streams` (streams.Streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Protocol

from backend.h2grpc.flood import ABUSE_LIMIT, ABUSE_WINDOW, Flood
from backend.h2grpc.frames import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_WINDOW,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    ERROR_NAMES,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    HEADERS,
    INTERNAL_ERROR,
    NO_ERROR,
    PADDED,
    PING,
    PRIORITY,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    ConnectionLevelError,
    FrameReader,
    frame,
    goaway,
    settings_frame,
    window_update,
)
from backend.h2grpc.headers import (
    MAX_HEADER_LIST,
    HeaderBytes,
    HeaderReader,
    Headers,
)
from backend.h2grpc.inflow import RECV_WINDOW, Inflow, RequestBytes
from backend.h2grpc.liveness import Liveness, Timeouts
from backend.h2grpc.outflow import Sender
from backend.h2grpc.pace import Pacer
from backend.h2grpc.stream import Stream
from backend.h2grpc.streams import Streams

log = logging.getLogger(__name__)

# After a connection error: the GOAWAY, then our FIN, then whatever the peer
# still sends is read and dropped for up to GOAWAY_LINGER seconds (or until it
# closes), then the connection is aborted. Closed at once with the peer's
# bytes unread, the kernel answers with a reset instead of a FIN, and the reset
# discards a GOAWAY still queued to leave: the peer learns "connection reset",
# not why. The HTTP/2 server of Go's net/http waits 1 s the same way
# (goAwayTimeout, golang.org/issue/18701).
GOAWAY_LINGER = 1.0
# Our socket send buffer (the kernel doubles it). Left to autotuning it grew to
# 4 MiB for a peer that never read: ~60,000 replies answered before asyncio's
# write buffer filled and we stopped reading (outflow.Sender.pause). Token
# replies are small and the gateway reads them at once.
SEND_BUFFER = 128 * 1024


class CallEvents(Protocol):
    """The layer above (calls.Dispatcher): what the connection tells it."""

    def opened(self, conn: Connection, stream: Stream) -> None:
        """A new stream's request headers arrived: check them (the stream may
        end at once) and attach the call (`stream.attach`)."""

    def request_complete(self, conn: Connection, stream: Stream) -> None:
        """The peer ended its side of a stream still open on ours: the
        request is complete."""

    def request_data(self, conn: Connection, stream: Stream) -> None:
        """More of a request stream's bytes arrived (`stream.streaming`)."""


class Drops(Protocol):
    def warn(self, kind: str, message: str, *args: object) -> None: ...


class Owner(Timeouts, Protocol):
    """What a connection needs of its server (server.Server), besides the
    timeouts liveness reads."""

    @property
    def calls(self) -> CallEvents: ...
    @property
    def drops(self) -> Drops: ...

    stopping: bool
    pacer: Pacer
    request_bytes: RequestBytes
    header_bytes: HeaderBytes
    max_message_bytes: int
    max_buffered: int
    max_concurrent_streams: int

    def admit(self, conn: Connection) -> bool: ...
    def release(self, conn: Connection) -> None: ...
    def busy(self, conn: Connection, busy: bool) -> None:
        """The connection has calls running now (or, `busy` False, none any more)."""


class Connection(asyncio.Protocol):
    def __init__(self, server: Owner) -> None:
        self.server = server
        self.calls = server.calls
        self.transport: asyncio.Transport | None = None
        self.flood = Flood(ABUSE_LIMIT, ABUSE_WINDOW)
        self.sender = Sender(self.flood, self._sent)
        self.inflow = Inflow(
            self.sender.write, server.max_message_bytes, server.max_buffered, server.request_bytes
        )
        self.liveness = Liveness(self, server)
        self.streams = Streams(
            self.sender, self.inflow, self.flood, self.liveness, server.header_bytes, self._busy
        )
        self.reader = FrameReader()
        self.headers = HeaderReader()
        self.holds: set[str] = set()  # why reading is paused ("socket", "turn")
        self.closing = False
        self.lingering: asyncio.TimerHandle | None = None  # see GOAWAY_LINGER
        self.goaway_sent = False
        self.peer = ""

    # ---- what the layers below and above call -----------------------------------

    @property
    def preface_seen(self) -> bool:
        return self.reader.preface_seen

    def write(self, data: bytes) -> None:
        self.sender.write(data)

    def dropped(self, kind: str, message: str, *args: object) -> None:
        self.server.drops.warn(kind, message, *args)

    def _busy(self, busy: bool) -> None:
        self.server.busy(self, busy)

    def _sent(self, stream: Stream) -> None:
        self.streams.sent(stream)

    # ---- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.sender.attach(self.transport)  # type: ignore[arg-type]
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            except OSError:
                pass
            if isinstance(peer, tuple):
                family = "ipv6" if sock.family == socket.AF_INET6 else "ipv4"
                self.peer = f"{family}:{peer[0]}:{peer[1]}"
        else:
            self.peer = f"unix:{peer or ''}"
        server = self.server
        if not server.admit(self):
            # Over the cap: SETTINGS first (the server preface), then why.
            self.sender.write(
                frame(SETTINGS, 0, 0) + goaway(0, ENHANCE_YOUR_CALM, b"too many connections")
            )
            self.close()
            return
        self.sender.write(
            settings_frame(server.max_concurrent_streams, RECV_WINDOW, MAX_HEADER_LIST)
            + window_update(0, RECV_WINDOW - DEFAULT_WINDOW)
        )
        self.liveness.start()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing()
        self.server.release(self)
        if self.lingering is not None:
            self.lingering.cancel()
        self._end_calls()

    def _end_calls(self) -> None:
        """Nothing more is read or sent for this connection's calls: cancel
        them and give back what they held (twice is harmless)."""
        self.liveness.stop()
        self.streams.close_all()
        self.sender.release()
        self.inflow.close()

    def pause_writing(self) -> None:
        """A peer that does not read its replies gets no more requests read
        (and answered) until it does, not even those already read."""
        self.sender.pause()
        self._hold("socket")

    def resume_writing(self) -> None:
        self.sender.resume()
        self._release("socket")

    def _hold(self, why: str) -> None:
        """Stop reading, for `why` ("socket": the peer does not read what we
        send; "turn": frames already read wait for the next loop turn)."""
        if not self.holds and self.transport is not None and not self.closing:
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()
        self.holds.add(why)

    def _release(self, why: str) -> None:
        if why not in self.holds:
            return
        self.holds.discard(why)
        if not self.holds and self.transport is not None and not self.closing:
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()
        if why == "socket":  # the frames read before it filled
            asyncio.get_running_loop().call_soon(self._frames)

    def data_received(self, data: bytes) -> None:
        if self.closing:  # lingering after a connection error: dropped unread
            return
        self.liveness.last_activity = time.monotonic()
        try:
            self.reader.feed(data)
        except ConnectionLevelError as exc:
            self._connection_error(exc.code, str(exc))
            return
        self._frames()

    def _frames(self) -> None:
        """Handle what was read, within the loop turn's time (pace.py), none
        while the peer does not read what we send."""
        if self.closing or "socket" in self.holds:
            return
        reader = self.reader
        pacer = self.server.pacer
        try:
            while (got := reader.next()) is not None:
                self._frame_received(*got)
                if self.closing or "socket" in self.holds:
                    return
                if pacer.spent():
                    self._hold("turn")
                    asyncio.get_running_loop().call_soon(self._frames)
                    return
            self._release("turn")
        except ConnectionLevelError as exc:
            self._connection_error(exc.code, str(exc))
        except Exception:  # a bug here must not leave the connection half-parsed
            log.exception("HTTP/2 frame handling failed")
            self._connection_error(INTERNAL_ERROR, "internal error")

    # ---- frames in -----------------------------------------------------------

    def _frame_received(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.headers.header_stream and kind != CONTINUATION:
            raise ConnectionLevelError(PROTOCOL_ERROR, "expected CONTINUATION")
        if kind == WINDOW_UPDATE:
            self.flood.window_update()
        elif (kind in (SETTINGS, PRIORITY, RST_STREAM) or kind > CONTINUATION) or (
            not payload and kind in (DATA, CONTINUATION) and not flags & END_STREAM
        ):
            self.flood.charge()
        if kind == DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == HEADERS:
            headers = self.headers.on_headers(flags, stream_id, payload)
            if headers is not None:
                self._headers_complete(stream_id, flags, headers)
        elif kind == CONTINUATION:
            block_flags = self.headers.header_flags  # the HEADERS frame's
            headers = self.headers.on_continuation(flags, stream_id, payload)
            if headers is not None:
                self._headers_complete(stream_id, block_flags, headers)
        elif kind == SETTINGS:
            if stream_id:
                raise ConnectionLevelError(PROTOCOL_ERROR, "SETTINGS on a stream")
            if not flags & ACK:
                self.sender.on_settings(payload)
        elif kind == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == PING:
            if len(payload) != 8 or stream_id:
                raise ConnectionLevelError(FRAME_SIZE_ERROR, "bad PING")
            if flags & ACK:
                self.liveness.on_ping_ack()
            else:
                self.liveness.on_ping(payload)
        elif kind == RST_STREAM:
            if stream_id == 0 or len(payload) != 4:
                raise ConnectionLevelError(PROTOCOL_ERROR, "bad RST_STREAM")
            if stream_id > self.streams.last_id:
                raise ConnectionLevelError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            self.streams.peer_reset(stream_id)
        elif kind == PUSH_PROMISE:
            raise ConnectionLevelError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # GOAWAY: the client stops opening streams, the open ones finish.
        # PRIORITY (counted above) and unknown types are ignored (RFC 9113 §4.1).

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionLevelError(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise ConnectionLevelError(PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self.sender.open_window(increment)
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                if stream_id > self.streams.last_id:
                    raise ConnectionLevelError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
                return
            if not self.sender.open_stream_window(stream, increment):
                self.streams.reset(stream, FLOW_CONTROL_ERROR)  # RFC 9113 §6.9.1
                return
        self.sender.flush_pending()

    def _headers_complete(self, stream_id: int, flags: int, headers: Headers) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client: only END_STREAM matters
            if flags & END_STREAM:
                self._remote_end(stream)
            return
        server = self.server
        refuse = self.goaway_sent or server.stopping
        stream = self.streams.start(stream_id, headers, refuse, server.max_concurrent_streams)
        if stream is None:
            return
        self.calls.opened(self, stream)
        if flags & END_STREAM and not stream.done:
            self._remote_end(stream)

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ConnectionLevelError(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)  # flow-controlled: padding counts
        if flags & PADDED:
            if not payload or payload[0] >= size:
                raise ConnectionLevelError(PROTOCOL_ERROR, "bad DATA padding")
            payload = payload[1 : size - payload[0]]
        inflow = self.inflow
        inflow.receive(size)
        stream = self.streams.get(stream_id)
        if stream is None or stream.done:
            if stream_id > self.streams.last_id:
                raise ConnectionLevelError(PROTOCOL_ERROR, "DATA on an idle stream")
            self.streams.gone.data(stream_id, size)
            inflow.give_back(size)
            return
        if stream.remote_closed:  # half-closed (remote): RFC 9113 §5.1
            inflow.give_back(size)
            self.streams.reset(stream, STREAM_CLOSED)
            return
        if not stream.consume(size):
            inflow.give_back(size)
            self.streams.reset(stream, FLOW_CONTROL_ERROR)
            return
        inflow.give_back(size - len(payload))  # the padding
        refusal = inflow.hold(stream, payload)
        if refusal is not None:
            self.streams.finish(stream, *refusal)
            return
        if stream.streaming:
            self.calls.request_data(self, stream)
        if flags & END_STREAM:
            self._remote_end(stream)

    def _remote_end(self, stream: Stream) -> None:
        if self.streams.complete(stream):
            self.calls.request_complete(self, stream)

    # ---- the connection ends -------------------------------------------------------

    def goaway(self) -> None:
        if not self.goaway_sent:
            self.goaway_sent = True
            self.sender.write(goaway(self.streams.last_id, NO_ERROR))

    def evict(self) -> None:
        """The connection cap is reached and this connection has been idle
        longest (no call running): GOAWAY(NO_ERROR), after which a client
        reconnects, then the close."""
        if self.closing:
            self.close()  # already lingering: now
            return
        self.goaway_sent = True
        self.sender.write(goaway(self.streams.last_id, NO_ERROR, b"connection cap reached"))
        self.close(linger=GOAWAY_LINGER)

    def fail(self, exc: ConnectionLevelError) -> None:
        """A connection error found outside frame handling (messages.py's bombs)."""
        if not self.closing:
            self._connection_error(exc.code, str(exc))

    def _connection_error(self, code: int, reason: str) -> None:
        self.dropped(
            ERROR_NAMES.get(code, f"0x{code:x}"),
            "closing HTTP/2 connection from %s: %s",
            self.peer,
            reason,
        )
        self.sender.write(goaway(self.streams.last_id, code, reason.encode()))
        self.close(linger=GOAWAY_LINGER)

    def _closing(self) -> None:
        self.closing = True
        self.sender.stop()

    def close(self, linger: float = 0.0) -> None:
        """Send what is queued and close; with `linger`, half-close and drop
        the peer's bytes for that long first (see GOAWAY_LINGER). A plain close
        of a lingering connection aborts it now."""
        transport = self.transport
        if transport is None:
            return
        if self.closing:
            if not linger and self.lingering is not None:
                self.lingering.cancel()
                transport.abort()
            return
        self.sender.flush()
        self._closing()
        if not linger or not transport.can_write_eof():
            transport.close()
            return
        self._end_calls()
        transport.write_eof()
        # abort, not close: close would wait for a peer that does not read.
        self.lingering = asyncio.get_running_loop().call_later(linger, transport.abort)
