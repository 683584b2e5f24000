"""One client connection: HTTP/2 frames in, the RFC 9113 stream states, the
limits that keep a peer from taking more than its share, and ending streams.

What leaves is sending.py's, request windows inflow.py's, the connection's
timers liveness.py's; a call's own life is calls.py's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

import hpack

from backend.h2grpc import calls
from backend.h2grpc.calls import CallError, Stream
from backend.h2grpc.frames import (
    ACK,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    ERROR_NAMES,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    HEADERS,
    INTERNAL_ERROR,
    MAX_FRAME,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    S_ENABLE_PUSH,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_CONCURRENT_STREAMS,
    S_MAX_HEADER_LIST_SIZE,
    SETTINGS,
    STATUS_415,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    ConnectionLevelError,
    frame,
    goaway,
    rst_stream,
    trailer_block,
    window_update,
)
from backend.h2grpc.inflow import RECV_WINDOW, Inflow
from backend.h2grpc.liveness import Liveness
from backend.h2grpc.sending import Sender

if TYPE_CHECKING:
    from backend.h2grpc.server import Server

log = logging.getLogger(__name__)

MAX_HEADER_LIST = 64 * 1024
# Frames that cost work but carry no request forward (SETTINGS, PRIORITY,
# WINDOW_UPDATE, empty DATA or CONTINUATION, unknown types, a client's
# RST_STREAM: the rapid-reset attack) are counted per connection: more than
# ABUSE_LIMIT of them within ABUSE_WINDOW seconds is a flood, answered with
# GOAWAY(ENHANCE_YOUR_CALM) as nghttp2, grpc-go and C-core do. This bounds the
# loop time one connection can take.
# A WINDOW_UPDATE that returns window for DATA we sent is flow control, not a
# flood: each DATA frame sent earns the peer two uncounted ones (its stream's
# and the connection's; sending.UPDATES_PER_DATA_FRAME). Counting them all closed a
# well-behaved grpc client reading many token streams at once (C-core sent
# 1,020 WINDOW_UPDATEs a second on one connection in the soak, on a loaded
# machine; more on a quiet one). The credit kept is capped
# (sending.UPDATE_CREDIT_MAX).
ABUSE_LIMIT = 2000
ABUSE_WINDOW = 1.0
# Ended streams remembered per connection, for what the peer may still send on
# them: DATA in flight up to the window it had (beyond: FLOW_CONTROL_ERROR),
# nothing after its own END_STREAM or RST_STREAM (STREAM_CLOSED).
GONE_REMEMBERED = 1024
# After a connection error: the GOAWAY, then our FIN, then whatever the peer
# still sends is read and dropped for up to GOAWAY_LINGER seconds (or until it
# closes), then the connection is aborted. Closed at once with the peer's
# bytes unread, the kernel answers with a reset instead of a FIN, and the reset
# discards a GOAWAY still queued to leave: the peer learns "connection reset",
# not why. The HTTP/2 server of Go's net/http waits 1 s the same way
# (goAwayTimeout, golang.org/issue/18701).
GOAWAY_LINGER = 1.0


class Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.sender = Sender(self)
        self.inflow = Inflow(
            self.sender, server.max_message_bytes, server.max_buffered, server.request_bytes
        )
        self.liveness = Liveness(self)
        self.buffer = bytearray()
        self.preface_seen = False
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self.streams: dict[int, Stream] = {}
        self.last_stream_id = 0
        self.header_stream = 0  # stream id whose header block is being continued
        self.header_block = bytearray()
        self.header_flags = 0
        self.closing = False
        self.lingering: asyncio.TimerHandle | None = None  # see GOAWAY_LINGER
        self.goaway_sent = False
        self.peer = ""
        self.abuse = 0
        self.abuse_since = time.monotonic()
        self.update_credit = 0  # WINDOW_UPDATEs earned by DATA sent (see ABUSE_LIMIT)
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
        if not server.admit(self):
            # Over the cap: SETTINGS first (the server preface), then why.
            self.sender.write(
                frame(SETTINGS, 0, 0) + goaway(0, ENHANCE_YOUR_CALM, b"too many connections")
            )
            self.close()
            return
        settings = struct.pack(
            ">HIHIHIHI",
            S_MAX_CONCURRENT_STREAMS, server.max_concurrent_streams,
            S_INITIAL_WINDOW_SIZE, RECV_WINDOW,
            S_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST,
            S_ENABLE_PUSH, 0,
        )  # fmt: skip
        self.sender.write(
            frame(SETTINGS, 0, 0, settings) + window_update(0, RECV_WINDOW - DEFAULT_WINDOW)
        )
        self.liveness.start()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        if self.lingering is not None:
            self.lingering.cancel()
        self._end_calls()

    def _end_calls(self) -> None:
        """Nothing more is read or sent for this connection's calls: cancel
        them and give back what they held (twice is harmless)."""
        self.liveness.stop()
        for stream in list(self.streams.values()):
            calls.cancel(stream, None)
        self.streams.clear()
        self.sender.release()
        self.inflow.close()

    def pause_writing(self) -> None:
        self.sender.pause()

    def resume_writing(self) -> None:
        self.sender.resume()

    def data_received(self, data: bytes) -> None:
        if self.closing:  # lingering after a connection error: dropped unread
            return
        self.liveness.last_activity = time.monotonic()
        buf = self.buffer
        buf += data
        try:
            if not self.preface_seen:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        raise ConnectionLevelError(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                    return
                if buf[: len(PREFACE)] != PREFACE:
                    raise ConnectionLevelError(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                del buf[: len(PREFACE)]
                self.preface_seen = True
            pos = 0
            end = len(buf)
            while end - pos >= 9:
                length = int.from_bytes(buf[pos : pos + 3], "big")
                if length > MAX_FRAME:
                    raise ConnectionLevelError(FRAME_SIZE_ERROR, "frame larger than 16384 bytes")
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
        except ConnectionLevelError as exc:
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
                raise ConnectionLevelError(ENHANCE_YOUR_CALM, "flood of control or empty frames")
            self.abuse = 1
            self.abuse_since = now

    def _frame_received(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.header_stream and kind != CONTINUATION:
            raise ConnectionLevelError(PROTOCOL_ERROR, "expected CONTINUATION")
        if kind == WINDOW_UPDATE and self.update_credit > 0:
            self.update_credit -= 1
        elif (kind in (SETTINGS, WINDOW_UPDATE, PRIORITY, RST_STREAM) or kind > CONTINUATION) or (
            not payload and kind in (DATA, CONTINUATION) and not flags & END_STREAM
        ):
            self._charge()
        if kind == DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif kind == CONTINUATION:
            if stream_id == 0 or stream_id != self.header_stream:
                raise ConnectionLevelError(PROTOCOL_ERROR, "unexpected CONTINUATION")
            self.header_block += payload
            if len(self.header_block) > MAX_HEADER_LIST * 2:
                raise ConnectionLevelError(ENHANCE_YOUR_CALM, "header block too large")
            if flags & END_HEADERS:
                self._headers_complete(stream_id, self.header_flags, bytes(self.header_block))
        elif kind == SETTINGS:
            if stream_id:
                raise ConnectionLevelError(PROTOCOL_ERROR, "SETTINGS on a stream")
            if not flags & ACK:
                self.sender.on_settings(payload)
        elif kind == WINDOW_UPDATE:
            self.sender.on_window_update(stream_id, payload)
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
            if stream_id > self.last_stream_id:
                raise ConnectionLevelError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            stream = self.drop(stream_id)
            self.sender.blocked.pop(stream_id, None)
            if stream is not None:
                calls.cancel(stream, None)
                stream.remote_closed = True  # nothing more may come on it
                self._forget(stream)
        elif kind == PUSH_PROMISE:
            raise ConnectionLevelError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # GOAWAY: the client stops opening streams, the open ones finish.
        # PRIORITY (counted above) and unknown types are ignored (RFC 9113 §4.1).

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or not stream_id & 1:
            raise ConnectionLevelError(PROTOCOL_ERROR, "HEADERS on an invalid stream id")
        pad = 0
        start = 0
        if flags & PADDED:
            if not payload:
                raise ConnectionLevelError(FRAME_SIZE_ERROR, "PADDED HEADERS without a pad length")
            pad = payload[0]
            start = 1
        if flags & PRIORITY_FLAG:
            start += 5
        if start + pad > len(payload):
            raise ConnectionLevelError(PROTOCOL_ERROR, "bad HEADERS padding")
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
            raise ConnectionLevelError(COMPRESSION_ERROR, f"bad header block: {exc}") from None
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client: only END_STREAM matters
            if flags & END_STREAM:
                self._remote_end(stream)
            return
        if stream_id <= self.last_stream_id:
            left = self.gone.get(stream_id)
            if left is None:  # never opened: ids must grow (RFC 9113 §5.1.1)
                raise ConnectionLevelError(PROTOCOL_ERROR, "HEADERS on a lower stream id")
            if left < 0:
                raise ConnectionLevelError(STREAM_CLOSED, "HEADERS after the stream ended")
            return  # trailers racing our reset of the stream
        self.last_stream_id = stream_id
        server = self.server
        if (
            self.goaway_sent
            or server.stopping
            or len(self.streams) >= server.max_concurrent_streams
        ):
            self.sender.write(rst_stream(stream_id, REFUSED_STREAM))
            return
        stream = Stream(stream_id, self, self.sender.initial_window, RECV_WINDOW)
        stream.headers = [(bytes(k), bytes(v)) for k, v in headers]
        self.streams[stream_id] = stream
        self._start(stream)
        if flags & END_STREAM and not stream.done:
            self._remote_end(stream)

    def _start(self, stream: Stream) -> None:
        """Validate the request headers; errors end the stream at once."""
        try:
            stream.method = calls.check_request(stream, self.server)
        except CallError as exc:
            self.finish(stream, exc.code, exc.details)
            return
        except calls.NotGrpc as exc:
            if exc.reset is not None:
                self.reset(stream, exc.reset)
            else:  # RFC: answer 415 for a wrong content type
                self._end(stream, frame(HEADERS, END_HEADERS | END_STREAM, stream.id, STATUS_415))
            return
        if stream.deadline is not None:
            delay = max(0.0, stream.deadline - time.monotonic())
            stream.timer = asyncio.get_running_loop().call_later(delay, calls.expire, stream)

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
            if stream_id > self.last_stream_id:
                raise ConnectionLevelError(PROTOCOL_ERROR, "DATA on an idle stream")
            left = self.gone.get(stream_id)
            if left is not None:
                if left < 0:
                    raise ConnectionLevelError(STREAM_CLOSED, "DATA after the stream ended")
                if left < size:
                    raise ConnectionLevelError(
                        FLOW_CONTROL_ERROR, "DATA beyond a closed stream's window"
                    )
                self.gone[stream_id] = left - size
            inflow.give_back(size)
            return
        if stream.remote_closed:  # half-closed (remote): RFC 9113 §5.1
            inflow.give_back(size)
            self.reset(stream, STREAM_CLOSED)
            return
        stream.recv_window -= size
        if stream.recv_window < 0:
            inflow.give_back(size)
            self.reset(stream, FLOW_CONTROL_ERROR)
            return
        inflow.give_back(size - len(payload))  # the padding
        refusal = inflow.hold(stream, payload)
        if refusal is not None:
            self.finish(stream, *refusal)
        elif flags & END_STREAM:
            self._remote_end(stream)

    def _remote_end(self, stream: Stream) -> None:
        """The request is complete: decode it and run the handler."""
        stream.remote_closed = True
        if stream.done or stream.task is not None:
            return
        target = stream.method
        if target is None:
            return
        try:
            body = self.inflow.take(stream)  # the message is the handler's now
            request = calls.decode_request(
                body, stream.encoding, target, self.server.max_message_bytes
            )
        except CallError as exc:
            self.finish(stream, exc.code, exc.details)
            return
        stream.task = task = asyncio.get_running_loop().create_task(
            calls.run(stream, target, request)
        )
        # The loop keeps only weak references to tasks.
        self.server.tasks[task] = stream
        task.add_done_callback(self.server.tasks.pop)

    # ---- ending streams ----------------------------------------------------------

    def finish(self, stream: Stream, code: int, details: str) -> None:
        """Send the status (trailers, or trailers-only when nothing was sent)."""
        if stream.done:
            return
        trailers_only = not stream.headers_sent
        stream.headers_sent = True
        block = trailer_block(code, details, trailers_only)
        out = frame(HEADERS, END_HEADERS | END_STREAM, stream.id, block)
        if not stream.remote_closed:
            # We answered before the request was complete: stop the upload.
            out += rst_stream(stream.id, NO_ERROR)
        self._end(stream, out)

    def reset(self, stream: Stream, code: int) -> None:
        """End the stream with RST_STREAM(code), dropping what it still had to send."""
        self.sender.drop(stream)
        self._end(stream, rst_stream(stream.id, code))

    def _end(self, stream: Stream, data: bytes) -> None:
        stream.done = True
        self._forget(stream)
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        if stream.pending:
            # The status follows the data still waiting for window.
            stream.after = data
        else:
            self.drop(stream.id)
            self.sender.write(data)
        if stream.task is not None and not stream.task.done() and stream.task is not _current():
            stream.task.cancel()

    def _forget(self, stream: Stream) -> None:
        """The stream ended: free its request, remember what the peer may still send."""
        self.inflow.release(stream)
        gone = self.gone
        gone[stream.id] = -1 if stream.remote_closed else max(0, stream.recv_window)
        if len(gone) > GONE_REMEMBERED:
            del gone[next(iter(gone))]

    def drop(self, stream_id: int) -> Stream | None:
        """The stream leaves the connection's table (nothing more to send on it)."""
        stream = self.streams.pop(stream_id, None)
        if not self.streams:
            self.liveness.idle_since = time.monotonic()
        return stream

    # ---- the connection ends -------------------------------------------------------

    def goaway(self) -> None:
        if not self.goaway_sent:
            self.goaway_sent = True
            self.sender.write(goaway(self.last_stream_id, NO_ERROR))

    def _connection_error(self, code: int, reason: str) -> None:
        self.server.drops.warn(
            ERROR_NAMES.get(code, f"0x{code:x}"),
            "closing HTTP/2 connection from %s: %s",
            self.peer,
            reason,
        )
        self.sender.write(goaway(self.last_stream_id, code, reason.encode()))
        self.close(linger=GOAWAY_LINGER)

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
        self.closing = True
        if not linger or not transport.can_write_eof():
            transport.close()
            return
        self._end_calls()
        transport.write_eof()
        # abort, not close: close would wait for a peer that does not read.
        self.lingering = asyncio.get_running_loop().call_later(linger, transport.abort)


def _current() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None
