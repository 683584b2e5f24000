"""A gRPC request message: the length-prefixed body of a call checked,
decompressed within the message limit, and decoded."""

from __future__ import annotations

import zlib

from google.protobuf.message import DecodeError, Message

from backend.h2grpc.frames import GRPC_PREFIX, Status


class CallError(Exception):
    """The call ends with this gRPC status before its handler runs."""

    def __init__(self, code: Status, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def decode_request(
    body: bytes, encoding: bytes, request_type: type[Message], max_bytes: int
) -> Message:
    """The complete body of a unary request (one length-prefixed message) as
    `request_type`; CallError when it is not one."""
    if len(body) < 5:
        raise CallError(Status.INTERNAL, "the request carries no message")
    compressed, length = GRPC_PREFIX.unpack_from(body)
    if len(body) != 5 + length:
        raise CallError(Status.INTERNAL, "the request must be exactly one message")
    raw = body[5:]
    try:
        if compressed:
            if encoding == b"identity":
                raise ValueError("compressed message without grpc-encoding")
            wbits = 31 if encoding == b"gzip" else 15
            decomp = zlib.decompressobj(wbits)
            raw = decomp.decompress(raw, max_bytes + 1)
            if len(raw) > max_bytes or decomp.unconsumed_tail:
                raise CallError(Status.RESOURCE_EXHAUSTED, "decompressed message larger than max")
        return request_type.FromString(raw)
    except (DecodeError, ValueError, zlib.error) as exc:
        # Protobuf refuses invalid UTF-8 in a string field with the same
        # generic error as a malformed message, so both are named.
        name = request_type.DESCRIPTOR.full_name
        raise CallError(
            Status.INVALID_ARGUMENT,
            f"cannot decode the request as {name}: malformed protobuf, or a string "
            f"field that is not valid UTF-8 ({exc})",
        ) from None
