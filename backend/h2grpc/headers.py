"""Header blocks in: HEADERS and CONTINUATION frames assembled into one block,
HPACK-decoded with the `hpack` package (python-hyper's) under the limits we
advertise."""

from __future__ import annotations

import hpack

from backend.h2grpc.frames import (
    COMPRESSION_ERROR,
    END_HEADERS,
    ENHANCE_YOUR_CALM,
    FRAME_SIZE_ERROR,
    PADDED,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    ConnectionLevelError,
)

MAX_HEADER_LIST = 64 * 1024

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
        except Exception as exc:  # hpack's errors: the connection's table is now unusable
            raise ConnectionLevelError(COMPRESSION_ERROR, f"bad header block: {exc}") from None
        return [(bytes(k), bytes(v)) for k, v in headers]
