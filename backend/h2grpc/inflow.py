"""Request bytes into one connection: the flow-control windows we grant, and
what we hold until a request's handler takes it.

Window goes back for bytes we do not keep at once, and for bytes we keep when
their message goes to its handler, so what a peer can make a connection hold
is what it was granted (RFC 9113 §6.9). Two things shape the grants:

* every admitted message must be able to complete, whatever order the peer
  sends its streams' frames in (grpc clients interleave them in 16 KiB
  frames): otherwise half-received messages could use up the connection window
  and wait for each other forever. So once a message's prefix has told its
  size, the window is kept at least what admitted messages still need (`owed`),
  and a message larger than the stream's initial window gets the rest of its
  stream window at once;
* a message is admitted only while what is held plus what is owed stays within
  the connection's bound (`max_buffered`), and the same sum over all
  connections within the worker's (`RequestBytes`), so both bounds are enforced
  by flow control itself; beyond them the call ends RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from collections.abc import Callable

from backend.h2grpc.frames import FLOW_CONTROL_ERROR, ConnectionLevelError, Status, window_update
from backend.h2grpc.stream import Stream

# What we let a client send before it must wait for our WINDOW_UPDATE, per
# stream (SETTINGS_INITIAL_WINDOW_SIZE) and per connection. Request messages
# are small except images/LoadModel; 4 MiB windows keep a large one from
# stalling on round trips.
RECV_WINDOW = 4 * 1024 * 1024


class RequestBytes:
    """What every connection of one server holds and owes for unfinished
    requests, against one limit: without it, N connections could hold N times
    the per-connection bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0


class Inflow:
    def __init__(
        self,
        write: Callable[[bytes], None],
        max_message_bytes: int,
        max_buffered: int,
        pool: RequestBytes,
    ) -> None:
        self.write = write  # frames out (outflow.Sender.write)
        self.max_message_bytes = max_message_bytes
        self.max_buffered = max_buffered
        self.pool = pool
        self.closed = False
        self.window = RECV_WINDOW  # the connection window the peer has left
        self.returned = 0  # window due back to the peer, sent in batches (give_back)
        self.buffered = 0  # request bytes held in stream bodies
        self.owed = 0  # sum of the open streams' `need`

    def _count(self, delta: int) -> None:
        """buffered + owed changed by `delta`: the worker's total follows."""
        if not self.closed:
            self.pool.held += delta

    def close(self) -> None:
        """The connection is gone: what it held and owed leaves the worker's total."""
        self._count(-(self.buffered + self.owed))
        self.closed = True

    def receive(self, size: int) -> None:
        """A DATA frame of `size` flow-controlled bytes arrived on the connection."""
        self.window -= size
        if self.window < 0:
            raise ConnectionLevelError(FLOW_CONTROL_ERROR, "DATA beyond the connection window")

    def give_back(self, size: int) -> None:
        """`size` bytes of connection window are due back to the peer (bytes not
        kept, or handed to a handler); sent in batches of half the window, or
        at once when the window no longer covers what admitted messages need."""
        self.returned += size
        # What the peer holds is `window`: `returned` is ours until it is sent.
        short = self.owed - self.window
        if short > 0 or self.returned >= RECV_WINDOW // 2:
            grant = max(self.returned, short)
            self.write(window_update(0, grant))
            self.window += grant
            self.returned = 0

    def hold(self, stream: Stream, payload: bytes) -> tuple[Status, str] | None:
        """Keep `payload` for the stream's request; a status to end the call
        with when it cannot be kept (see the module docstring)."""
        if stream.streaming:
            return self._hold_streaming(stream, payload)
        owed = stream.need is not None
        stream.keep(payload)
        self.buffered += len(payload)
        if owed:
            self.owed -= len(payload)  # held now, owed no more: the total is unchanged
            if stream.need is not None and stream.need < 0:  # a unary call carries one message
                return Status.INTERNAL, "the request must be exactly one message"
            return None
        self._count(len(payload))
        body = stream.body
        if len(body) < 5:
            return None
        declared = int.from_bytes(body[1:5], "big")
        limit = self.max_message_bytes
        if declared > limit:
            return (
                Status.RESOURCE_EXHAUSTED,
                f"Received message larger than max ({declared} vs. {limit})",
            )
        need = 5 + declared - len(body)
        if need < 0:
            return Status.INTERNAL, "the request must be exactly one message"
        if self.buffered + self.owed + need > self.max_buffered:
            return Status.RESOURCE_EXHAUSTED, "too many request bytes waiting on this connection"
        if self.pool.held + need > self.pool.limit:
            return Status.RESOURCE_EXHAUSTED, "too many request bytes waiting in this worker"
        stream.expect(need)
        self.owed += need
        self._count(need)
        if need > stream.recv_window:  # a message larger than the initial window
            self.write(window_update(stream.id, stream.widen(need)))
        self.give_back(0)
        return None

    def _hold_streaming(self, stream: Stream, payload: bytes) -> tuple[Status, str] | None:
        """A request stream's bytes: its handler takes them a message at a
        time (next_message), and only then does the stream's window come
        back; so the stream window paces the peer, and the connection window
        is given back at once (a handler that stops reading blocks its own
        stream, not the connection's others)."""
        stream.keep(payload)
        size = len(payload)
        self.buffered += size
        self._count(size)
        self.give_back(size)
        if self.buffered > self.max_buffered:
            return Status.RESOURCE_EXHAUSTED, "too many request bytes waiting on this connection"
        if self.pool.held > self.pool.limit:
            return Status.RESOURCE_EXHAUSTED, "too many request bytes waiting in this worker"
        return None

    def next_message(self, stream: Stream) -> bytes | tuple[Status, str] | None:
        """A request stream's next whole message (its window goes back), None
        until it has come, or a status to end the call with."""
        body = stream.body
        if len(body) < 5:
            return None
        declared = int.from_bytes(body[1:5], "big")
        if declared > self.max_message_bytes:
            limit = self.max_message_bytes
            return (
                Status.RESOURCE_EXHAUSTED,
                f"Received message larger than max ({declared} vs. {limit})",
            )
        size = 5 + declared
        missing = size - len(body)
        if missing > 0:
            if missing > stream.recv_window:  # larger than the window: make room
                self.write(window_update(stream.id, stream.widen(missing)))
            return None
        message = stream.take_message(size)
        self.buffered -= size
        self._count(-size)
        self.write(window_update(stream.id, stream.widen(stream.recv_window + size)))
        return message

    def take(self, stream: Stream) -> bytes:
        """The stream's request, for its handler: its window goes back."""
        body = stream.take_body()
        self.buffered -= len(body)
        self._count(-len(body))
        self.give_back(len(body))
        return body

    def release(self, stream: Stream) -> None:
        """The stream ended without its handler taking the request: drop it."""
        held, owed = stream.drop_body()
        self.buffered -= held
        self.owed -= owed
        self._count(-(held + owed))
        if not stream.streaming:  # a request stream's went back on arrival
            self.give_back(held)
