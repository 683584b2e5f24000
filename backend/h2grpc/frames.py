"""HTTP/2 and gRPC wire format: constants, frames and the header blocks we send.

The lowest layer of the package: it imports nothing of it. Replies only send
literal header fields (no dynamic table), so encoding needs no HPACK state;
decoding what peers send uses the `hpack` package (headers.py).
"""

from __future__ import annotations

import struct
from enum import IntEnum

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
ERROR_NAMES = {
    NO_ERROR: "NO_ERROR", PROTOCOL_ERROR: "PROTOCOL_ERROR", INTERNAL_ERROR: "INTERNAL_ERROR",
    FLOW_CONTROL_ERROR: "FLOW_CONTROL_ERROR", STREAM_CLOSED: "STREAM_CLOSED",
    FRAME_SIZE_ERROR: "FRAME_SIZE_ERROR", REFUSED_STREAM: "REFUSED_STREAM", CANCEL: "CANCEL",
    COMPRESSION_ERROR: "COMPRESSION_ERROR", ENHANCE_YOUR_CALM: "ENHANCE_YOUR_CALM",
}  # fmt: skip
# Settings.
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
MAX_FRAME = 16_384  # our SETTINGS_MAX_FRAME_SIZE (the default) and the peer's until it says


class Status(IntEnum):
    """gRPC status codes (grpc.StatusCode's numbers, without importing grpc here)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# gRPC's length prefix: compressed flag, message length.
GRPC_PREFIX = struct.Struct(">BI")

# Pre-encoded HPACK: ":status: 200" is static-table entry 8 (0x88);
# content-type is static name 31, a literal without indexing.
CONTENT_TYPE = b"application/grpc"
RESPONSE_HEADERS = b"\x88\x0f\x10" + bytes([len(CONTENT_TYPE)]) + CONTENT_TYPE


class ConnectionLevelError(Exception):
    """A connection error (RFC 9113 §5.4.1): GOAWAY with `code`, then the close."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


Frame = tuple[int, int, int, bytes]  # type, flags, stream id, payload


class FrameReader:
    """A client's bytes as frames: the preface, then each whole frame in turn;
    what is incomplete waits for more bytes."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.pos = 0  # the next frame's offset in `buffer`
        self.preface_seen = False

    def feed(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        if not self.preface_seen:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    raise ConnectionLevelError(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                return
            if buf[: len(PREFACE)] != PREFACE:
                raise ConnectionLevelError(PROTOCOL_ERROR, "not an HTTP/2 client preface")
            del buf[: len(PREFACE)]
            self.preface_seen = True

    def next(self) -> Frame | None:
        """The next whole frame, or None until more bytes come."""
        buf = self.buffer
        pos = self.pos
        if not self.preface_seen or len(buf) - pos < 9:
            self._rest()
            return None
        length = int.from_bytes(buf[pos : pos + 3], "big")
        if length > MAX_FRAME:
            raise ConnectionLevelError(FRAME_SIZE_ERROR, "frame larger than 16384 bytes")
        if len(buf) - pos < 9 + length:
            self._rest()
            return None
        self.pos = pos + 9 + length
        return (
            buf[pos + 3],
            buf[pos + 4],
            int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF,
            bytes(buf[pos + 9 : pos + 9 + length]),
        )

    def _rest(self) -> None:
        """No whole frame left: only the incomplete rest stays buffered."""
        if self.pos:
            del self.buffer[: self.pos]
            self.pos = 0


# A DATA frame's header and the gRPC length prefix of the one message it
# carries, packed at once (the frame length is 24 bits: its high byte, then
# the low 16): `data_message` builds a streamed message with one pack and one
# concatenation.
_DATA_MESSAGE = struct.Struct(">BHBBIBI")


def data_message(stream_id: int, message: bytes) -> bytes:
    """One uncompressed gRPC message in one DATA frame (it must fit one frame)."""
    size = len(message) + 5
    return (
        _DATA_MESSAGE.pack(size >> 16, size & 0xFFFF, DATA, 0, stream_id, 0, len(message)) + message
    )


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


def settings_frame(max_streams: int, initial_window: int, max_header_list: int) -> bytes:
    """Our SETTINGS (the server preface): no push."""
    settings = struct.pack(
        ">HIHIHIHI",
        S_MAX_CONCURRENT_STREAMS, max_streams,
        S_INITIAL_WINDOW_SIZE, initial_window,
        S_MAX_HEADER_LIST_SIZE, max_header_list,
        S_ENABLE_PUSH, 0,
    )  # fmt: skip
    return frame(SETTINGS, 0, 0, settings)


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">II", last_stream_id, code) + debug)


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, code.to_bytes(4, "big"))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, increment.to_bytes(4, "big"))


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


def literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


# A request that is not gRPC gets HTTP 415 (the gRPC-over-HTTP/2 spec).
STATUS_415 = literal(b":status", b"415")


def _percent_encode(text: str) -> bytes:
    out = bytearray()
    for b in text.encode("utf-8", "replace"):
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def trailer_block(code: Status, details: str, trailers_only: bool) -> bytes:
    """grpc-status and grpc-message (percent-encoded), after the response
    headers when nothing else was sent (a trailers-only response)."""
    block = RESPONSE_HEADERS if trailers_only else b""
    block += literal(b"grpc-status", b"%d" % code)
    if details:
        block += literal(b"grpc-message", _percent_encode(details))
    return block


_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_timeout(value: bytes) -> float | None:
    """grpc-timeout ("<1-8 digits><unit>") in seconds, None when malformed."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]
