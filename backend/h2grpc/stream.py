"""One HTTP/2 stream's state (RFC 9113 §5.1): what came in, what waits to go
out, its windows. Only the methods here change a `Stream`; the layers above
read its fields and call them.

The call a stream carries (calls.py) is attached as a `CallHandle`: the one
thing a stream tells the layer above is that it closed.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from backend.h2grpc.frames import FLOW_CONTROL_ERROR, STREAM_CLOSED, ConnectionLevelError

# Ended streams remembered per connection, for what the peer may still send on
# them: DATA in flight up to the window it had (beyond: FLOW_CONTROL_ERROR),
# nothing after its own END_STREAM or RST_STREAM (STREAM_CLOSED).
GONE_REMEMBERED = 1024


class CallHandle(Protocol):
    def stream_closed(self) -> None:
        """Nothing more can be sent on the stream: stop the handler (unless it
        is the one ending the stream) and its timers."""


class Stream:
    """Request side: `headers`, then `body` bytes held until the request's
    handler takes them (`need`: bytes still to come once the message prefix
    has told its size, None before; reserved in the connection window,
    inflow.py). Reply side: `pending` DATA waiting for flow-control window,
    `after` the trailers waiting for it to leave."""

    __slots__ = (
        "after",
        "body",
        "call",
        "done",
        "drained",
        "header_bytes",
        "headers",
        "headers_sent",
        "id",
        "keeps_busy",
        "need",
        "pending",
        "recv_window",
        "remote_closed",
        "send_credit",
        "streaming",
    )

    def __init__(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], recv_window: int, size: int = 0
    ) -> None:
        self.id = stream_id
        self.headers = headers
        self.header_bytes = size  # their decoded size (headers.list_size)
        self.body = bytearray()
        self.need: int | None = None
        self.recv_window = recv_window  # what the peer may still send (our SETTINGS)
        self.remote_closed = False  # the peer sent END_STREAM or RST_STREAM
        self.done = False  # our side ended (trailers or reset sent, or reset received)
        self.headers_sent = False
        # The send window minus the peer's SETTINGS_INITIAL_WINDOW_SIZE (its
        # WINDOW_UPDATEs minus what we sent): a SETTINGS change then moves
        # every stream's window at once, without visiting them (outflow.py).
        self.send_credit = 0
        self.pending = bytearray()
        self.drained: asyncio.Future[None] | None = None
        self.after = b""
        self.call: CallHandle | None = None
        self.keeps_busy = True  # its call counts as the connection being in use
        self.streaming = False  # its request is a stream of messages (inflow.py)

    def attach(self, call: CallHandle, keeps_busy: bool = True, streaming: bool = False) -> None:
        """`keeps_busy` False: a call that may run forever without being work
        (a health Watch) does not keep the connection from eviction.
        `streaming`: the request is a stream of messages, taken one by one."""
        self.call = call
        self.keeps_busy = keeps_busy
        self.streaming = streaming

    # ---- state ----------------------------------------------------------------

    def end_remote(self) -> None:
        """The peer will send nothing more (END_STREAM or RST_STREAM)."""
        self.remote_closed = True

    def close(self) -> None:
        """Our side ended; whoever waits to send is woken, the call is told."""
        if self.done:
            return
        self.done = True
        self.wake()
        if self.call is not None:
            self.call.stream_closed()

    # ---- request bytes (inflow.py) ----------------------------------------------

    def consume(self, size: int) -> bool:
        """`size` flow-controlled bytes arrived; False if beyond the window."""
        self.recv_window -= size
        return self.recv_window >= 0

    def widen(self, window: int) -> int:
        """Raise the receive window to `window`; the increment to grant."""
        increment = window - self.recv_window
        self.recv_window = window
        return increment

    def keep(self, payload: bytes) -> None:
        self.body += payload
        if self.need is not None:
            self.need -= len(payload)

    def expect(self, need: int) -> None:
        self.need = need

    def take_body(self) -> bytes:
        body = bytes(self.body)
        self.body = bytearray()
        return body

    def take_message(self, size: int) -> bytes:
        """The first `size` bytes of the body: one whole message."""
        message = bytes(self.body[:size])
        del self.body[:size]
        return message

    def drop_body(self) -> tuple[int, int]:
        """Forget the request: (bytes held, bytes still owed)."""
        held, owed = len(self.body), self.need or 0
        self.body = bytearray()
        if self.need is not None:
            self.need = 0
        return held, owed

    # ---- reply (outflow.py) -------------------------------------------------------

    def start_reply(self) -> bool:
        """Mark the response headers sent; whether they had been already."""
        sent = self.headers_sent
        self.headers_sent = True
        return sent

    def spend(self, size: int) -> None:
        self.send_credit -= size

    def credit(self, increment: int) -> None:
        self.send_credit += increment

    def queue(self, payload: bytes) -> None:
        self.pending += payload

    def dequeue(self, size: int) -> bytes:
        chunk = bytes(self.pending[:size])
        del self.pending[:size]
        return chunk

    def defer(self, trailers: bytes) -> None:
        """The status follows the data still waiting for window."""
        self.after = trailers

    def take_after(self) -> bytes:
        after, self.after = self.after, b""
        return after

    def drop_pending(self) -> None:
        self.pending = bytearray()
        self.after = b""

    def wait_drained(self) -> asyncio.Future[None]:
        self.drained = asyncio.get_running_loop().create_future()
        return self.drained

    def wake(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)


class Gone:
    """A connection's ended streams (the last GONE_REMEMBERED): what the peer
    may still send on each. A stream id not here, at or below the last one
    opened, is one that never opened (or was forgotten)."""

    def __init__(self) -> None:
        self.left: dict[int, int] = {}  # stream id -> window it had; -1: the peer had ended it

    def remember(self, stream: Stream) -> None:
        left = self.left
        left[stream.id] = -1 if stream.remote_closed else max(0, stream.recv_window)
        if len(left) > GONE_REMEMBERED:
            del left[next(iter(left))]

    def data(self, stream_id: int, size: int) -> None:
        """DATA of `size` flow-controlled bytes on an ended stream."""
        left = self.left.get(stream_id)
        if left is None:
            return
        if left < 0:
            raise ConnectionLevelError(STREAM_CLOSED, "DATA after the stream ended")
        if left < size:
            raise ConnectionLevelError(FLOW_CONTROL_ERROR, "DATA beyond a closed stream's window")
        self.left[stream_id] = left - size

    def known(self, stream_id: int) -> bool:
        """HEADERS on an ended stream: True for trailers racing our reset of
        it, False if it never opened."""
        left = self.left.get(stream_id)
        if left is None:
            return False
        if left < 0:
            raise ConnectionLevelError(STREAM_CLOSED, "HEADERS after the stream ended")
        return True
