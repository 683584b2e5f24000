"""What leaves one connection: frames batched into one write per loop turn, and
reply DATA kept within the peer's flow-control windows and frame size (which
its SETTINGS and WINDOW_UPDATE frames set)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import TYPE_CHECKING

from backend.h2grpc.frames import (
    ACK,
    DATA,
    DEFAULT_WINDOW,
    END_HEADERS,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    HEADERS,
    MAX_FRAME,
    MAX_WINDOW,
    PROTOCOL_ERROR,
    RESPONSE_HEADERS,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_FRAME_SIZE,
    SETTINGS,
    ConnectionLevelError,
    frame,
)

if TYPE_CHECKING:
    from backend.h2grpc.calls import Stream
    from backend.h2grpc.connection import Connection

# Each DATA frame sent earns the peer this many WINDOW_UPDATEs that are not
# counted as a flood (its stream's and the connection's; connection.ABUSE_LIMIT),
# up to UPDATE_CREDIT_MAX kept.
UPDATES_PER_DATA_FRAME = 2
UPDATE_CREDIT_MAX = 65_536


class Sender:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.out: list[bytes] = []  # frames queued for this loop iteration's write
        self.flush_scheduled = False
        self.window = DEFAULT_WINDOW  # the peer's connection window
        self.initial_window = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.max_frame = MAX_FRAME  # the peer's SETTINGS_MAX_FRAME_SIZE
        self.blocked: dict[int, Stream] = {}  # streams with data waiting for window
        self.paused: asyncio.Future[None] | None = None  # the socket's buffer is full

    def write(self, data: bytes) -> None:
        """Queue `data`; everything queued in one event-loop iteration leaves in
        one socket write. At concurrency N one engine step wakes N streams, and
        their N messages then cost one syscall instead of N."""
        conn = self.conn
        if conn.transport is None or conn.closing:
            return
        self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        transport = self.conn.transport
        if self.out and transport is not None and not self.conn.closing:
            transport.write(b"".join(self.out) if len(self.out) > 1 else self.out[0])
        self.out.clear()

    def pause(self) -> None:
        """The socket's write buffer is above its high-water mark."""
        if self.paused is None or self.paused.done():
            self.paused = asyncio.get_running_loop().create_future()
        # A peer that does not read its replies gets no more requests read
        # (and answered) until it does: what we queue for it stays bounded.
        transport = self.conn.transport
        if transport is not None and not self.conn.closing:
            with contextlib.suppress(RuntimeError):
                transport.pause_reading()

    def resume(self) -> None:
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)
        transport = self.conn.transport
        if transport is not None and not self.conn.closing:
            with contextlib.suppress(RuntimeError):
                transport.resume_reading()

    def release(self) -> None:
        """The connection is gone: nothing waits for the socket any more."""
        self.blocked.clear()
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)

    async def send_message(self, stream: Stream, payload: bytes) -> None:
        """One length-prefixed gRPC message as DATA (headers first if not yet sent),
        waiting for flow-control window or a slow socket as needed."""
        head = b""
        if not stream.headers_sent:
            stream.headers_sent = True
            head = frame(HEADERS, END_HEADERS, stream.id, RESPONSE_HEADERS)
        size = len(payload)
        if not stream.pending and size <= self.window and size <= stream.send_window:
            self.window -= size
            stream.send_window -= size
            if size <= self.max_frame:
                self._earn(1)
                self.write(head + frame(DATA, 0, stream.id, payload))
            else:
                self.write(head + self._data_frames(stream.id, payload))
        else:
            if head:
                self.write(head)
            stream.pending += payload
            self.blocked[stream.id] = stream
            self.flush_pending()
        while stream.pending and not stream.done:
            stream.drained = asyncio.get_running_loop().create_future()
            await stream.drained
        if stream.done:
            raise asyncio.CancelledError()
        if self.paused is not None and not self.paused.done():
            await self.paused

    def _data_frames(self, stream_id: int, payload: bytes) -> bytes:
        step = self.max_frame
        self._earn(-(-len(payload) // step))
        return b"".join(
            frame(DATA, 0, stream_id, payload[i : i + step]) for i in range(0, len(payload), step)
        )

    def _earn(self, data_frames: int) -> None:
        """DATA frames sent earn the peer the WINDOW_UPDATEs that return their
        window (not counted as a flood, see connection.ABUSE_LIMIT)."""
        conn = self.conn
        conn.update_credit = min(
            conn.update_credit + UPDATES_PER_DATA_FRAME * data_frames, UPDATE_CREDIT_MAX
        )

    def flush_pending(self) -> None:
        """Send what waits for window, now that there may be some."""
        for stream in list(self.blocked.values()):
            if self.window <= 0:
                return
            size = min(len(stream.pending), self.window, stream.send_window)
            if size <= 0:
                continue
            chunk = bytes(stream.pending[:size])
            del stream.pending[:size]
            self.window -= size
            stream.send_window -= size
            self.write(self._data_frames(stream.id, chunk))
            if stream.pending:
                continue
            del self.blocked[stream.id]
            if stream.drained is not None and not stream.drained.done():
                stream.drained.set_result(None)
            if stream.after:  # the status the handler already gave
                self.write(stream.after)
                stream.after = b""
                self.conn.drop(stream.id)

    def on_settings(self, payload: bytes) -> None:
        """The peer's SETTINGS: what concerns sending (windows, frame size)."""
        if len(payload) % 6:
            raise ConnectionLevelError(FRAME_SIZE_ERROR, "bad SETTINGS length")
        for off in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, off)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionLevelError(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.initial_window
                self.initial_window = value
                for stream in self.conn.streams.values():
                    stream.send_window += delta
            elif key == S_MAX_FRAME_SIZE:
                if not MAX_FRAME <= value <= 16_777_215:
                    raise ConnectionLevelError(PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self.max_frame = value
        self.write(frame(SETTINGS, ACK, 0))
        self.flush_pending()

    def on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionLevelError(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        conn = self.conn
        if stream_id == 0:
            if increment == 0:
                raise ConnectionLevelError(PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self.window += increment
            if self.window > MAX_WINDOW:
                raise ConnectionLevelError(FLOW_CONTROL_ERROR, "connection window overflow")
        else:
            stream = conn.streams.get(stream_id)
            if stream is None:
                if stream_id > conn.last_stream_id:
                    raise ConnectionLevelError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
                return
            if stream.send_window + increment > MAX_WINDOW:
                conn.reset(stream, FLOW_CONTROL_ERROR)  # RFC 9113 §6.9.1
                return
            stream.send_window += increment
        self.flush_pending()

    def drop(self, stream: Stream) -> None:
        """The stream was reset: what it still had to send is dropped."""
        stream.pending = bytearray()
        stream.after = b""
        self.blocked.pop(stream.id, None)
