"""Header blocks in: HEADERS and CONTINUATION frames assembled into one block,
HPACK-decoded with the `hpack` package (python-hyper's) under the limits we
advertise, and the decoded bytes that unfinished requests hold, counted.

Limits, each a bound on what one peer's header blocks cost:
* MAX_HEADER_LIST (SETTINGS_MAX_HEADER_LIST_SIZE, advertised): C-core's
  default hard limit, 16 KiB of decoded fields (RFC 9113 §6.5.2 counts each
  field as name + value + 32). hpack stops decoding a block the moment it goes
  past, so decoding costs at most that much; the peer broke a limit it was
  told, and the connection's HPACK state is now out of step with the peer's:
  a connection error (ENHANCE_YOUR_CALM, as hyper-h2 answers it).
* MAX_FIELDS per block: a request carries a dozen; more is refused
  (RESOURCE_EXHAUSTED), the HPACK state kept. Decoding costs ~6 µs a field
  here (hpack is pure Python): a refused block is charged as a flood frame
  per MAX_FIELDS fields (flood.py).
* What requests hold until they are complete (HEADERS without END_STREAM:
  nothing runs, the fields stay): PER_CONNECTION per connection (beyond:
  the new request is refused), and the worker's `HeaderBytes` limit over all
  connections (beyond: the oldest unfinished request in the worker is ended,
  so a full budget never refuses the gateway's next request, which completes
  in the same read).
"""

from __future__ import annotations

from collections.abc import Callable

import hpack

from backend.h2grpc.flood import Flood
from backend.h2grpc.frames import (
    COMPRESSION_ERROR,
    END_HEADERS,
    ENHANCE_YOUR_CALM,
    FRAME_SIZE_ERROR,
    PADDED,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    ConnectionLevelError,
    Status,
)
from backend.h2grpc.stream import Stream

MAX_HEADER_LIST = 16 * 1024
MAX_FIELDS = 64
PER_CONNECTION = 1024 * 1024
PER_WORKER = 8 * 1024 * 1024

Headers = list[tuple[bytes, bytes]]


class HeaderReader:
    """One connection's header blocks. `header_stream` is non-zero while a
    block is being continued: nothing but CONTINUATION may come then."""

    def __init__(self) -> None:
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self.header_stream = 0  # stream id whose header block is being continued
        self.header_block = bytearray()
        self.header_flags = 0

    def on_headers(self, flags: int, stream_id: int, payload: bytes) -> Headers | None:
        """A HEADERS frame: the decoded block when it ends here, else None."""
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
            return self._decode(block)
        self.header_stream = stream_id
        self.header_flags = flags
        self.header_block = bytearray(block)
        return None

    def on_continuation(self, flags: int, stream_id: int, payload: bytes) -> Headers | None:
        """A CONTINUATION frame: the decoded block when it ends here (its
        HEADERS frame's flags are `header_flags`), else None."""
        if stream_id == 0 or stream_id != self.header_stream:
            raise ConnectionLevelError(PROTOCOL_ERROR, "unexpected CONTINUATION")
        self.header_block += payload
        if len(self.header_block) > MAX_HEADER_LIST * 2:
            raise ConnectionLevelError(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            return self._decode(bytes(self.header_block))
        return None

    def _decode(self, block: bytes) -> Headers:
        self.header_stream = 0
        self.header_block = bytearray()
        try:
            headers = self.decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError:
            raise ConnectionLevelError(
                ENHANCE_YOUR_CALM, f"header list larger than {MAX_HEADER_LIST} bytes"
            ) from None
        except Exception as exc:  # hpack's errors: the connection's table is now unusable
            raise ConnectionLevelError(COMPRESSION_ERROR, f"bad header block: {exc}") from None
        return [(bytes(k), bytes(v)) for k, v in headers]


def list_size(headers: Headers) -> int:
    """The decoded size RFC 9113 §6.5.2 (and hpack) count."""
    return sum(len(k) + len(v) + 32 for k, v in headers)


class HeaderBytes:
    """The worker's unfinished requests' header bytes, oldest first."""

    def __init__(self, limit: int = PER_WORKER) -> None:
        self.limit = limit
        self.held = 0
        self.waiting: dict[Stream, HeldHeaders] = {}
        self.evicted = 0

    def make_room(self, size: int) -> None:
        """End the oldest unfinished requests until `size` more fits."""
        while self.held + size > self.limit and self.waiting:
            stream = next(iter(self.waiting))
            holder = self.waiting.pop(stream)
            holder.held -= stream.header_bytes
            self.held -= stream.header_bytes
            self.evicted += 1
            holder.evict(stream)


class HeldHeaders:
    """One connection's unfinished requests' header bytes. `evict(stream)` ends
    a request the worker's budget has no room for (RESOURCE_EXHAUSTED)."""

    def __init__(self, pool: HeaderBytes, flood: Flood, evict: Callable[[Stream], None]) -> None:
        self.pool = pool
        self.flood = flood
        self.evict = evict
        self.held = 0

    def admit(self, stream: Stream, fields: int) -> tuple[Status, str] | None:
        """Count a new stream's headers in; a status to refuse it with."""
        size = stream.header_bytes
        if fields > MAX_FIELDS:
            for _ in range(fields // MAX_FIELDS):
                self.flood.charge()
            return Status.RESOURCE_EXHAUSTED, f"{fields} header fields, more than {MAX_FIELDS}"
        if self.held + size > PER_CONNECTION:
            return (
                Status.RESOURCE_EXHAUSTED,
                "too many header bytes held by unfinished requests on this connection",
            )
        pool = self.pool
        pool.make_room(size)
        pool.waiting[stream] = self
        pool.held += size
        self.held += size
        return None

    def release(self, stream: Stream) -> None:
        """The request is complete, or ended: its headers no longer count."""
        if self.pool.waiting.pop(stream, None) is not None:
            self.held -= stream.header_bytes
            self.pool.held -= stream.header_bytes
