"""One connection's streams: those open (and which of them have a call
running), the ended ones remembered, the limits on opening one, and how one
ends: with a gRPC status, a reset, or HTTP 415."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from backend.h2grpc.flood import Flood
from backend.h2grpc.frames import (
    END_HEADERS,
    END_STREAM,
    HEADERS,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    STATUS_415,
    ConnectionLevelError,
    Status,
    frame,
    rst_stream,
    trailer_block,
)
from backend.h2grpc.headers import HeaderBytes, Headers, HeldHeaders, list_size
from backend.h2grpc.inflow import RECV_WINDOW, Inflow
from backend.h2grpc.liveness import Liveness
from backend.h2grpc.outflow import Sender
from backend.h2grpc.stream import Gone, Stream


class Streams:
    """`busy(True)` when the first call starts running, `busy(False)` when
    the last one ends (the server's connection cap evicts idle connections)."""

    def __init__(
        self,
        sender: Sender,
        inflow: Inflow,
        flood: Flood,
        liveness: Liveness,
        header_bytes: HeaderBytes,
        busy: Callable[[bool], None],
    ) -> None:
        self.sender = sender
        self.inflow = inflow
        self.flood = flood
        self.liveness = liveness
        self.held = HeldHeaders(header_bytes, flood, self._evict_request)
        self.busy = busy
        self.open: dict[int, Stream] = {}
        self.last_id = 0  # the highest stream id the peer opened
        self.gone = Gone()
        self.in_call: set[int] = set()  # streams whose request is complete, still open

    def __len__(self) -> int:
        return len(self.open)

    def __iter__(self) -> Iterator[Stream]:
        return iter(list(self.open.values()))

    def get(self, stream_id: int) -> Stream | None:
        return self.open.get(stream_id)

    def start(self, stream_id: int, headers: Headers, refuse: bool, max_open: int) -> Stream | None:
        """A header block on a stream not open: the new stream, or None
        (refused, or trailers racing our reset of an ended one)."""
        if stream_id <= self.last_id:
            if not self.gone.known(stream_id):  # ids must grow (RFC 9113 §5.1.1)
                raise ConnectionLevelError(PROTOCOL_ERROR, "HEADERS on a lower stream id")
            return None
        self.last_id = stream_id
        if refuse or len(self.open) >= max_open:
            self.flood.charge()  # see flood.py: read or not, each costs a frame out
            self.sender.write(rst_stream(stream_id, REFUSED_STREAM))
            return None
        stream = Stream(stream_id, headers, RECV_WINDOW, list_size(headers))
        self.open[stream_id] = stream
        refusal = self.held.admit(stream, len(headers))
        if refusal is not None:
            self.finish(stream, *refusal)
            return None
        return stream

    def complete(self, stream: Stream) -> bool:
        """The peer ended its side: True if the request is now the call's."""
        stream.end_remote()
        self.held.release(stream)
        if stream.done:
            return False
        if stream.keeps_busy:
            if not self.in_call:
                self.busy(True)
            self.in_call.add(stream.id)
        return True

    def take_request(self, stream: Stream) -> bytes:
        """The stream's request bytes, for its handler (their window goes back)."""
        return self.inflow.take(stream)

    def next_message(self, stream: Stream) -> bytes | tuple[Status, str] | None:
        """A request stream's next message (inflow.Inflow.next_message)."""
        return self.inflow.next_message(stream)

    def peer_reset(self, stream_id: int) -> None:
        """RST_STREAM from the peer."""
        stream = self.drop(stream_id)
        if stream is not None:
            self.sender.drop(stream)
            stream.close()
            stream.end_remote()  # nothing more may come on it
            self._forget(stream)

    def close_all(self) -> None:
        """The connection is gone: every stream closes, nothing is held."""
        for stream in list(self.open.values()):
            self.held.release(stream)
            stream.close()
        self.open.clear()

    # ---- ending streams ----------------------------------------------------------

    def finish(self, stream: Stream, code: Status, details: str) -> None:
        """Send the status (trailers, or trailers-only when nothing was sent)."""
        if stream.done:
            return
        trailers_only = not stream.start_reply()
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

    def refuse_not_grpc(self, stream: Stream) -> None:
        """HTTP 415: the gRPC-over-HTTP/2 answer to a wrong content type."""
        self._end(stream, frame(HEADERS, END_HEADERS | END_STREAM, stream.id, STATUS_415))

    def _end(self, stream: Stream, data: bytes) -> None:
        self._forget(stream)
        if stream.pending:
            stream.defer(data)
        else:
            self.drop(stream.id)
            self.sender.write(data)
        stream.close()

    def _forget(self, stream: Stream) -> None:
        """The stream ended: free its request, remember what the peer may still send."""
        self.inflow.release(stream)
        self.held.release(stream)
        self.gone.remember(stream)

    def sent(self, stream: Stream) -> None:
        """Trailers that waited for window have left (outflow.Sender)."""
        self.drop(stream.id)

    def drop(self, stream_id: int) -> Stream | None:
        """The stream leaves the table (nothing more to send on it)."""
        stream = self.open.pop(stream_id, None)
        if not self.open:
            self.liveness.idle_since = time.monotonic()
        if stream_id in self.in_call:
            self.in_call.discard(stream_id)
            if not self.in_call:
                self.busy(False)
        return stream

    def _evict_request(self, stream: Stream) -> None:
        """The worker's budget for unfinished requests' headers needs room,
        and this request has waited longest (headers.HeaderBytes)."""
        self.finish(
            stream,
            Status.RESOURCE_EXHAUSTED,
            "the request was not completed in time: the worker's budget for header bytes "
            "of unfinished requests is full",
        )
