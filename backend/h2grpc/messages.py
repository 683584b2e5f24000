"""A gRPC request message: the length-prefixed body of a call checked,
decompressed within bounds, and decoded.

Decompression is the one place where a few bytes from a peer become a lot of
work: 64 KiB of gzip inflate to 64 MiB, ~0.17 s of CPU here. So it is
* incremental: INFLATE_STEP bytes of output at a time, with the event loop
  running between steps; no step holds the loop for more than a fraction of a
  millisecond;
* one message at a time in the worker (`turn`): what is being inflated is
  one message's worth (100 bombs inflating side by side held 650 MiB);
* bounded by the message limit, never inflating more than one byte past it;
* bounded by the ratio: a message may inflate to BOMB_RATIO times its
  compressed size (at least BOMB_FLOOR); text compresses 3-10 times, a
  message that goes past is a bomb. Its call ends RESOURCE_EXHAUSTED after at
  most that much work, and the connection is told (flood.Flood.bomb: a peer
  that keeps sending them is closed).
"""

from __future__ import annotations

import asyncio
import zlib

from google.protobuf.message import DecodeError, Message

from backend.h2grpc.frames import GRPC_PREFIX, Status

INFLATE_STEP = 256 * 1024
BOMB_RATIO = 100
BOMB_FLOOR = 1024 * 1024


class CallError(Exception):
    """The call ends with this gRPC status before its handler runs."""

    def __init__(self, code: Status, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Bomb(CallError):
    """A compressed message inflating beyond BOMB_RATIO times its size."""


def unframe(body: bytes) -> tuple[bool, bytes]:
    """The complete body of a unary request (one length-prefixed message):
    (compressed, the message bytes); CallError when it is not one."""
    if len(body) < 5:
        raise CallError(Status.INTERNAL, "the request carries no message")
    compressed, length = GRPC_PREFIX.unpack_from(body)
    if len(body) != 5 + length:
        raise CallError(Status.INTERNAL, "the request must be exactly one message")
    return bool(compressed), body[5:]


def parse(raw: bytes | bytearray, request_type: type[Message]) -> Message:
    try:
        return request_type.FromString(raw)
    except (DecodeError, ValueError) as exc:
        raise _undecodable(request_type, exc) from None


def _undecodable(request_type: type[Message], exc: Exception) -> CallError:
    # Protobuf refuses invalid UTF-8 in a string field with the same generic
    # error as a malformed message, so both are named.
    name = request_type.DESCRIPTOR.full_name
    return CallError(
        Status.INVALID_ARGUMENT,
        f"cannot decode the request as {name}: malformed protobuf, or a string "
        f"field that is not valid UTF-8 ({exc})",
    )


async def inflate(
    data: bytes, encoding: bytes, request_type: type[Message], max_bytes: int, turn: asyncio.Lock
) -> bytearray:
    """`data` decompressed (see the module docstring); CallError (Bomb for a
    bomb) when it cannot be."""
    if encoding == b"identity":
        raise _undecodable(request_type, ValueError("compressed message without grpc-encoding"))
    cap = min(max_bytes, max(BOMB_FLOOR, BOMB_RATIO * len(data)))
    decomp = zlib.decompressobj(31 if encoding == b"gzip" else 15)
    out = bytearray()
    tail = data
    async with turn:  # one message at a time: at most one inflating (see above)
        while True:
            try:
                chunk = decomp.decompress(tail, min(INFLATE_STEP, cap + 1 - len(out)))
            except zlib.error as exc:
                raise _undecodable(request_type, exc) from None
            out += chunk
            tail = decomp.unconsumed_tail
            if len(out) > cap:
                if cap == max_bytes:
                    raise CallError(
                        Status.RESOURCE_EXHAUSTED, "decompressed message larger than max"
                    )
                raise Bomb(
                    Status.RESOURCE_EXHAUSTED,
                    f"the message inflates to more than {BOMB_RATIO} times its {len(data)} "
                    "compressed bytes (a compression bomb)",
                )
            if decomp.eof or not (tail or chunk):
                return out
            await asyncio.sleep(0)  # the loop runs between steps
