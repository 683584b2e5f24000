"""One gRPC call: the method table, the stream's state, the request headers and
message checked and decoded, the `context` its handler sees (grpc.aio's
ServicerContext, the parts the worker uses), the handler run to its status,
cancelled, or timed out."""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf.message import DecodeError, Message

from backend.h2grpc.frames import CONTENT_TYPE, GRPC_PREFIX, PROTOCOL_ERROR, parse_timeout

if TYPE_CHECKING:
    from backend.h2grpc.connection import Connection
    from backend.h2grpc.server import Server

log = logging.getLogger(__name__)


class AbortError(grpc.aio.AbortError):
    """Raised by `context.abort`; ends the RPC with its status. A grpc.aio
    AbortError, so handler code written for grpc.aio (servicer._unary lets
    those through untouched) treats both transports' aborts alike."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class NotGrpc(Exception):
    """Not a well-formed gRPC request: RST_STREAM(`reset`), or HTTP 415 when None."""

    def __init__(self, reset: int | None) -> None:
        super().__init__(reset)
        self.reset = reset


class CallError(Exception):
    """The call ends with this gRPC status before its handler runs."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass(frozen=True, slots=True)
class Method:
    handler: Callable[[Any, Context], Awaitable[Any]]
    request_type: type[Message]
    streaming: bool


def methods_of(servicer: Any, service: Any) -> dict[str, Method]:
    """`/package.Service/Method` -> Method for every method `servicer` defines,
    from the service's protobuf descriptor (`backend_pb2.DESCRIPTOR.services_by_name[...]`)."""
    from google.protobuf import message_factory

    table = {}
    for m in service.methods:
        if m.client_streaming:
            continue  # not served by this transport (the worker has none)
        handler = getattr(servicer, m.name, None)
        if handler is None:
            continue
        request_type = message_factory.GetMessageClass(m.input_type)
        table[f"/{service.full_name}/{m.name}"] = Method(handler, request_type, m.server_streaming)
    return table


class Stream:
    """One HTTP/2 stream carrying one call: what came in, what waits to go out."""

    __slots__ = (
        "after",
        "body",
        "cancel_status",
        "conn",
        "deadline",
        "done",
        "drained",
        "encoding",
        "headers",
        "headers_sent",
        "id",
        "method",
        "need",
        "pending",
        "recv_window",
        "remote_closed",
        "send_window",
        "task",
        "timer",
    )

    def __init__(
        self, stream_id: int, conn: Connection, send_window: int, recv_window: int
    ) -> None:
        self.id = stream_id
        self.conn = conn
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.remote_closed = False
        self.done = False  # our side ended (trailers or reset sent, or reset received)
        self.task: asyncio.Task[None] | None = None
        self.send_window = send_window
        self.headers_sent = False
        self.pending = bytearray()  # DATA payload waiting for flow-control window
        self.drained: asyncio.Future[None] | None = None
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.encoding = b"identity"
        # (code, details) to send when the task is cancelled by us (deadline,
        # shutdown); None: cancelled because the peer went away.
        self.cancel_status: tuple[int, str] | None = None
        self.method: Method | None = None
        self.recv_window = recv_window  # what the peer may still send (our SETTINGS)
        # Request bytes still to come once the message's prefix has told its
        # size (None before): reserved in the connection window (inflow.py).
        self.need: int | None = None
        self.after = b""  # trailers waiting for `pending` to leave


class Context:
    """What a handler sees of its call (grpc.aio's ServicerContext, the parts we use)."""

    __slots__ = ("_metadata", "_stream")

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._metadata: tuple[tuple[str, str | bytes], ...] | None = None

    async def write(self, message: Message) -> None:
        stream = self._stream
        if stream.done:
            raise asyncio.CancelledError()
        data = message.SerializeToString()
        await stream.conn.sender.send_message(stream, GRPC_PREFIX.pack(0, len(data)) + data)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise AbortError(code.value[0], details)

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        if self._metadata is None:
            items: list[tuple[str, str | bytes]] = []
            for key, value in self._stream.headers:
                if key.startswith(b":") or key in (b"te", b"content-type", b"grpc-timeout"):
                    continue
                name = key.decode("latin-1")
                if name.endswith("-bin"):
                    items.append((name, base64.b64decode(value + b"==")))
                else:
                    items.append((name, value.decode("latin-1")))
            self._metadata = tuple(items)
        return self._metadata

    def cancelled(self) -> bool:
        return self._stream.done

    def peer(self) -> str:
        return self._stream.conn.peer

    def time_remaining(self) -> float | None:
        deadline = self._stream.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())


def check_request(stream: Stream, server: Server) -> Method:
    """The method the request headers call (the stream takes their deadline and
    encoding); CallError or NotGrpc when the request cannot be served."""
    path = method = content_type = b""
    te = b"trailers"
    auth = None
    for key, value in stream.headers:
        if key == b":path":
            path = value
        elif key == b":method":
            method = value
        elif key == b"content-type":
            content_type = value
        elif key == b"te":
            te = value
        elif key == b"grpc-timeout":
            timeout = parse_timeout(value)
            if timeout is not None:
                stream.deadline = time.monotonic() + timeout
        elif key == b"grpc-encoding":
            stream.encoding = value
        elif key == b"authorization":
            auth = value
    if te != b"trailers":  # RFC 9113 §8.2.2: a malformed request
        raise NotGrpc(PROTOCOL_ERROR)
    grpc_type = content_type == CONTENT_TYPE or content_type.startswith(
        (b"application/grpc+", b"application/grpc;")
    )
    if method != b"POST" or not grpc_type:
        raise NotGrpc(None)
    if (
        server.auth is not None
        and not path.startswith(server.auth_exempt)
        and not hmac.compare_digest(auth or b"", server.auth)
    ):
        raise CallError(16, "missing or invalid authorization bearer token")
    target = server.methods.get(path.decode("latin-1"))
    if target is None:
        # The path is the peer's (up to the header list limit): echo a
        # bounded prefix, or each refusal costs a copy of it both ways.
        raise CallError(12, f"Method not found: {path[:200].decode('latin-1')}")
    if stream.encoding not in (b"identity", b"gzip", b"deflate"):
        raise CallError(12, f"unsupported grpc-encoding {stream.encoding.decode()!r}")
    return target


def decode_request(body: bytes, encoding: bytes, target: Method, max_bytes: int) -> Message:
    """The complete body of a unary request (one length-prefixed message) as
    the method's request type; CallError when it is not one."""
    if len(body) < 5:
        raise CallError(13, "the request carries no message")
    compressed, length = GRPC_PREFIX.unpack_from(body)
    if len(body) != 5 + length:
        raise CallError(13, "the request must be exactly one message")
    raw = body[5:]
    try:
        if compressed:
            if encoding == b"identity":
                raise ValueError("compressed message without grpc-encoding")
            wbits = 31 if encoding == b"gzip" else 15
            decomp = zlib.decompressobj(wbits)
            raw = decomp.decompress(raw, max_bytes + 1)
            if len(raw) > max_bytes or decomp.unconsumed_tail:
                raise CallError(8, "decompressed message larger than max")
        return target.request_type.FromString(raw)
    except (DecodeError, ValueError, zlib.error) as exc:
        # Protobuf refuses invalid UTF-8 in a string field with the same
        # generic error as a malformed message, so both are named.
        name = target.request_type.DESCRIPTOR.full_name
        raise CallError(
            3,
            f"cannot decode the request as {name}: malformed protobuf, or a string "
            f"field that is not valid UTF-8 ({exc})",
        ) from None


async def run(stream: Stream, target: Method, request: Message) -> None:
    """The handler's task: run it and end the stream with its status."""
    conn = stream.conn
    context = Context(stream)
    try:
        result = await target.handler(request, context)
        if stream.done:
            return
        if not target.streaming:
            if result is None:
                conn.finish(stream, 13, "the handler returned no reply")
                return
            data = result.SerializeToString()
            await conn.sender.send_message(stream, GRPC_PREFIX.pack(0, len(data)) + data)
        conn.finish(stream, 0, "")
    except AbortError as exc:
        conn.finish(stream, exc.code, exc.details)
    except asyncio.CancelledError:
        if stream.cancel_status is not None and not stream.done:
            conn.finish(stream, *stream.cancel_status)
        # else: the peer reset the stream or left; nobody to tell
    except Exception as exc:
        log.exception("unhandled error in %s", target.handler.__name__)
        conn.finish(stream, 2, f"Unexpected {type(exc).__name__}")


def cancel(stream: Stream, status: tuple[int, str] | None) -> None:
    """Cancel the handler; `status` is sent if we cancel (None: the peer left)."""
    if status is None:
        stream.done = True
    stream.cancel_status = status
    if stream.timer is not None:
        stream.timer.cancel()
        stream.timer = None
    if stream.drained is not None and not stream.drained.done():
        stream.drained.set_result(None)
    if stream.task is not None and not stream.task.done():
        stream.task.cancel()


def expire(stream: Stream) -> None:
    """The call's grpc-timeout has passed."""
    stream.timer = None
    if not stream.done:
        cancel(stream, (4, "Deadline Exceeded"))
        if stream.task is None:
            stream.conn.finish(stream, 4, "Deadline Exceeded")
