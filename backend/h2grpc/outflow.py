"""What leaves one connection: frames batched into one write per loop turn
(a streamed message of a stream alone on its connection is written at once),
and reply DATA kept within the peer's flow-control windows and frame size
(which its SETTINGS and WINDOW_UPDATE frames set)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

from backend.h2grpc.flood import Flood
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
    data_message,
    frame,
)
from backend.h2grpc.stream import Stream


class Sender:
    """`sent(stream)` is called when trailers that waited for window have left
    (the connection then forgets the stream)."""

    def __init__(self, flood: Flood, sent: Callable[[Stream], None]) -> None:
        self.flood = flood
        self.sent = sent
        self.transport: asyncio.Transport | None = None
        self.closed = False  # the connection is closing: nothing more is written
        self.out: list[bytes] = []  # frames queued for this loop iteration's write
        self.flush_scheduled = False
        self.window = DEFAULT_WINDOW  # the peer's connection window
        # The peer's SETTINGS_INITIAL_WINDOW_SIZE: a stream's send window is
        # this plus its `send_credit`.
        self.initial_window = DEFAULT_WINDOW
        self.max_frame = MAX_FRAME  # the peer's SETTINGS_MAX_FRAME_SIZE
        self.blocked: dict[int, Stream] = {}  # streams with data waiting for window
        self.paused: asyncio.Future[None] | None = None  # the socket's buffer is full

    def attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        # Looked up once: asyncio.get_running_loop() costs a getpid() system
        # call on every use (CPython 3.11 checks for a fork), once per token here.
        self.loop = asyncio.get_running_loop()

    def stop(self) -> None:
        """The connection is closing: what is queued from now on is dropped."""
        self.closed = True

    def write(self, data: bytes, *, now: bool = False) -> None:
        """Queue `data`; everything queued in one event-loop iteration leaves in
        one socket write. At concurrency N one engine step wakes N streams, and
        their N messages then cost one syscall instead of N. `now`: nothing
        else can share the write, so unless frames already wait, it is made at
        once rather than on the loop's next turn."""
        if self.transport is None or self.closed:
            return
        if now and not self.out:
            self.transport.write(data)
            return
        self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        transport = self.transport
        if self.out and transport is not None and not self.closed:
            transport.write(b"".join(self.out) if len(self.out) > 1 else self.out[0])
        self.out.clear()

    def pause(self) -> None:
        """The socket's write buffer is above its high-water mark: handlers
        wait before their next message (the connection stops reading)."""
        if self.paused is None or self.paused.done():
            self.paused = asyncio.get_running_loop().create_future()

    def resume(self) -> None:
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)

    def release(self) -> None:
        """The connection is gone: nothing waits for the socket any more."""
        self.blocked.clear()
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)

    def send_now(self, stream: Stream, message: bytes, *, alone: bool = False) -> bool:
        """The common case of a streamed message, without a coroutine: the
        reply's headers are out, nothing waits for window, the windows take
        it, it fits one frame and the socket is not full. Sends it as one
        DATA frame and returns True; False: `send_message` must (it waits).

        `alone`: no other stream of the connection is open, so no other
        message can share this one's write: it is written now, not on the
        loop's next turn (which would cost a turn of the loop per token)."""
        size = len(message) + 5
        if (
            not stream.headers_sent
            or stream.pending
            or size > self.window
            or size > self.initial_window + stream.send_credit
            or size > self.max_frame
            or (self.paused is not None and not self.paused.done())
        ):
            return False
        self.window -= size
        stream.spend(size)
        self.flood.earn(1)
        self.write(data_message(stream.id, message), now=alone)
        return True

    async def send_message(self, stream: Stream, payload: bytes) -> None:
        """One length-prefixed gRPC message as DATA (headers first if not yet sent),
        waiting for flow-control window or a slow socket as needed."""
        head = b""
        if not stream.headers_sent:
            stream.start_reply()
            head = frame(HEADERS, END_HEADERS, stream.id, RESPONSE_HEADERS)
        size = len(payload)
        if (
            not stream.pending
            and size <= self.window
            and size <= self.initial_window + stream.send_credit
        ):
            self.window -= size
            stream.spend(size)
            if size <= self.max_frame:
                self.flood.earn(1)
                self.write(head + frame(DATA, 0, stream.id, payload))
            else:
                self.write(head + self._data_frames(stream.id, payload))
        else:
            if head:
                self.write(head)
            stream.queue(payload)
            self.blocked[stream.id] = stream
            self.flush_pending()
        while stream.pending and not stream.done:
            await stream.wait_drained()
        if stream.done:
            raise asyncio.CancelledError()
        if self.paused is not None and not self.paused.done():
            await self.paused

    def _data_frames(self, stream_id: int, payload: bytes) -> bytes:
        step = self.max_frame
        self.flood.earn(-(-len(payload) // step))
        return b"".join(
            frame(DATA, 0, stream_id, payload[i : i + step]) for i in range(0, len(payload), step)
        )

    def flush_pending(self) -> None:
        """Send what waits for window, now that there may be some."""
        for stream in list(self.blocked.values()):
            if self.window <= 0:
                return
            size = min(len(stream.pending), self.window, self.initial_window + stream.send_credit)
            if size <= 0:
                continue
            chunk = stream.dequeue(size)
            self.window -= size
            stream.spend(size)
            self.write(self._data_frames(stream.id, chunk))
            if stream.pending:
                continue
            del self.blocked[stream.id]
            stream.wake()
            if stream.after:  # the status the handler already gave
                self.write(stream.take_after())
                self.sent(stream)

    def on_settings(self, payload: bytes) -> None:
        """The peer's SETTINGS: what concerns sending (windows, frame size).
        A new initial window moves every stream's window through
        `initial_window` alone: the cost is the entries', not entries times streams."""
        if len(payload) % 6:
            raise ConnectionLevelError(FRAME_SIZE_ERROR, "bad SETTINGS length")
        for off in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, off)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionLevelError(FLOW_CONTROL_ERROR, "initial window too large")
                self.initial_window = value
            elif key == S_MAX_FRAME_SIZE:
                if not MAX_FRAME <= value <= 16_777_215:
                    raise ConnectionLevelError(PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self.max_frame = value
        self.write(frame(SETTINGS, ACK, 0))
        self.flush_pending()

    def open_window(self, increment: int) -> None:
        """A WINDOW_UPDATE for the connection."""
        self.window += increment
        if self.window > MAX_WINDOW:
            raise ConnectionLevelError(FLOW_CONTROL_ERROR, "connection window overflow")

    def open_stream_window(self, stream: Stream, increment: int) -> bool:
        """A WINDOW_UPDATE for `stream`; False if it would overflow its window
        (a stream error, RFC 9113 §6.9.1)."""
        if self.initial_window + stream.send_credit + increment > MAX_WINDOW:
            return False
        stream.credit(increment)
        return True

    def drop(self, stream: Stream) -> None:
        """The stream was reset: what it still had to send is dropped."""
        stream.drop_pending()
        self.blocked.pop(stream.id, None)
