"""One gRPC call on an HTTP/2 stream: the method table, the request headers
and message (or, for client-streaming and bidirectional methods, messages)
checked and decoded, the `context` its handler sees (grpc.aio's
ServicerContext, the parts the worker uses), the handler run to its status,
cancelled, or timed out.

The connection below tells a `Dispatcher` (its `CallEvents`) that a stream's
headers came and that its request is complete; a `Call` is attached to the
stream, which tells it when the stream closes.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import grpc
from google.protobuf.message import Message

from backend.h2grpc.connection import Connection
from backend.h2grpc.frames import (
    CONTENT_TYPE,
    GRPC_PREFIX,
    PROTOCOL_ERROR,
    ConnectionLevelError,
    Status,
    parse_timeout,
)
from backend.h2grpc.messages import Bomb, CallError, inflate, parse, unframe
from backend.h2grpc.stream import Stream

log = logging.getLogger(__name__)


class AbortError(grpc.aio.AbortError):
    """Raised by `context.abort`; ends the RPC with its status. A grpc.aio
    AbortError, so handler code written for grpc.aio (servicer._unary lets
    those through untouched) treats both transports' aborts alike."""

    def __init__(self, code: Status, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class NotGrpc(Exception):
    """Not a well-formed gRPC request: RST_STREAM(`reset`), or HTTP 415 when None."""

    def __init__(self, reset: int | None) -> None:
        super().__init__(reset)
        self.reset = reset


@dataclass(frozen=True, slots=True)
class Method:
    """`handler(request, context)` is a coroutine function, or an async
    generator function yielding the replies (as grpc.aio allows);
    `client_streaming`: its `request` is an async iterator of messages."""

    handler: Callable[[Any, Context], Any]
    request_type: type[Message]
    streaming: bool
    client_streaming: bool = False


def methods_of(servicer: Any, service: Any) -> dict[str, Method]:
    """`/package.Service/Method` -> Method for every method `servicer` defines,
    from the service's protobuf descriptor (`backend_pb2.DESCRIPTOR.services_by_name[...]`)."""
    from google.protobuf import message_factory

    table = {}
    for m in service.methods:
        handler = getattr(servicer, m.name, None)
        if handler is None:
            continue
        request_type = message_factory.GetMessageClass(m.input_type)
        table[f"/{service.full_name}/{m.name}"] = Method(
            handler, request_type, m.server_streaming, m.client_streaming
        )
    return table


class Call:
    """The gRPC side of one stream: its method, deadline and handler task."""

    __slots__ = (
        "cancel_status",
        "conn",
        "deadline",
        "encoding",
        "method",
        "stream",
        "task",
        "timer",
        "waiting",
    )

    def __init__(self, conn: Connection, stream: Stream) -> None:
        self.conn = conn
        self.stream = stream
        self.method: Method | None = None
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.encoding = b"identity"
        self.task: asyncio.Task[None] | None = None
        # (code, details) to send when the task is cancelled by us (deadline,
        # shutdown); None: cancelled because the stream closed.
        self.cancel_status: tuple[Status, str] | None = None
        self.waiting: asyncio.Future[None] | None = None  # RequestStream, for bytes

    def wake(self) -> None:
        """Request bytes came, or the request ended (RequestStream)."""
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_result(None)

    def stream_closed(self) -> None:
        """The stream closed (stream.CallHandle): stop the handler, unless it
        is the task ending the stream."""
        self._stop_timer()
        task = self.task
        if task is not None and not task.done() and task is not _current():
            task.cancel()

    def cancel(self, code: Status, details: str) -> None:
        """End the call from our side (deadline, shutdown): the handler is
        cancelled and the status sent."""
        self.cancel_status = (code, details)
        self._stop_timer()
        self.stream.wake()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def expire(self) -> None:
        """The call's grpc-timeout has passed."""
        self.timer = None
        if not self.stream.done:
            self.cancel(Status.DEADLINE_EXCEEDED, "Deadline Exceeded")
            if self.task is None:
                self.conn.streams.finish(self.stream, Status.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Context:
    """What a handler sees of its call (grpc.aio's ServicerContext, the parts we use)."""

    __slots__ = ("_call", "_metadata", "_stream")

    def __init__(self, call: Call) -> None:
        self._call = call
        self._stream = call.stream
        self._metadata: tuple[tuple[str, str | bytes], ...] | None = None

    async def write(self, message: Message) -> None:
        stream = self._stream
        if stream.done:
            raise asyncio.CancelledError()
        data = message.SerializeToString()
        conn = self._call.conn
        sender = conn.sender
        if not sender.send_now(stream, data, alone=len(conn.streams.open) == 1):
            await sender.send_message(stream, GRPC_PREFIX.pack(0, len(data)) + data)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise AbortError(Status(code.value[0]), details)

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
        return self._call.conn.peer

    def time_remaining(self) -> float | None:
        deadline = self._call.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())


class RequestStream:
    """A client-streaming call's requests, as its handler iterates them: a
    message is taken from the stream's bytes only when asked for, so what
    waits is bounded by the stream's window (inflow.Inflow.next_message)."""

    def __init__(self, call: Call, dispatcher: Dispatcher) -> None:
        self.call = call
        self.dispatcher = dispatcher

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        call = self.call
        stream = call.stream
        target = call.method
        assert target is not None
        while True:
            if stream.done:
                raise asyncio.CancelledError()
            got = call.conn.streams.next_message(stream)
            if isinstance(got, bytes):
                compressed, raw = unframe(got)
                if not compressed:
                    return parse(raw, target.request_type)
                d = self.dispatcher
                inflated = await inflate(
                    raw, call.encoding, target.request_type, d.max_message_bytes, d.inflating
                )
                return parse(inflated, target.request_type)
            if got is not None:
                raise CallError(*got)
            if stream.remote_closed:
                if stream.body:
                    raise CallError(Status.INTERNAL, "the request stream ends inside a message")
                raise StopAsyncIteration
            call.waiting = asyncio.get_running_loop().create_future()
            await call.waiting


class Dispatcher:
    """Calls for every connection of one server (connection.CallEvents): the
    method table, the auth check, and the handler tasks (for a graceful stop)."""

    def __init__(
        self,
        methods: dict[str, Method],
        max_message_bytes: int,
        auth_token: str | None = None,
        auth_exempt: tuple[str, ...] = (),
        idle_calls: tuple[str, ...] = (),
    ) -> None:
        self.methods = methods
        # Paths whose calls may run forever without being work (health
        # watches): they do not keep a connection from eviction at the cap.
        self.idle_calls = frozenset(idle_calls)
        self.max_message_bytes = max_message_bytes
        self.auth = f"Bearer {auth_token}".encode() if auth_token else None
        # Path prefixes served without the token (the standard health service).
        self.auth_exempt = tuple(p.encode() for p in auth_exempt)
        self.tasks: dict[asyncio.Task[None], Call] = {}
        self.inflating = asyncio.Lock()  # one decompression step at a time (messages.py)

    def opened(self, conn: Connection, stream: Stream) -> None:
        """Validate the request headers; errors end the stream at once."""
        call = Call(conn, stream)
        keeps_busy = not self.idle_calls or _path(stream) not in self.idle_calls
        stream.attach(call, keeps_busy)
        try:
            call.method = self._check(call)
        except CallError as exc:
            conn.streams.finish(stream, exc.code, exc.details)
            return
        except NotGrpc as exc:
            if exc.reset is not None:
                conn.streams.reset(stream, exc.reset)
            else:  # RFC: answer 415 for a wrong content type
                conn.streams.refuse_not_grpc(stream)
            return
        if call.deadline is not None:
            delay = max(0.0, call.deadline - time.monotonic())
            call.timer = asyncio.get_running_loop().call_later(delay, call.expire)
        if call.method.client_streaming:  # the handler runs as the requests come
            stream.attach(call, keeps_busy, streaming=True)
            self._start(call, call.method, RequestStream(call, self))

    def request_data(self, conn: Connection, stream: Stream) -> None:
        call = cast(Call | None, stream.call)
        if call is not None:
            call.wake()

    def _start(self, call: Call, target: Method, request: Message | bytes | RequestStream) -> None:
        call.task = task = asyncio.get_running_loop().create_task(run(call, target, request, self))
        # The loop keeps only weak references to tasks.
        self.tasks[task] = call
        task.add_done_callback(self.tasks.pop)

    def request_complete(self, conn: Connection, stream: Stream) -> None:
        """Decode the request and run the handler."""
        call = cast(Call | None, stream.call)
        if call is None or call.method is None:
            return
        if call.task is not None:  # a request stream: its end is news to the handler
            call.wake()
            return
        target = call.method
        try:
            body = conn.streams.take_request(stream)  # the message is the handler's now
            compressed, raw = unframe(body)
            request = raw if compressed else parse(raw, target.request_type)
        except CallError as exc:
            conn.streams.finish(stream, exc.code, exc.details)
            return
        self._start(call, target, request)

    def _check(self, call: Call) -> Method:
        """The method the request headers call (the call takes their deadline
        and encoding); CallError or NotGrpc when the request cannot be served."""
        path = method = content_type = b""
        te = b"trailers"
        auth = None
        for key, value in call.stream.headers:
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
                    call.deadline = time.monotonic() + timeout
            elif key == b"grpc-encoding":
                call.encoding = value
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
            self.auth is not None
            and not path.startswith(self.auth_exempt)
            and not hmac.compare_digest(auth or b"", self.auth)
        ):
            raise CallError(Status.UNAUTHENTICATED, "missing or invalid authorization bearer token")
        target = self.methods.get(path.decode("latin-1"))
        if target is None:
            # The path is the peer's (up to the header list limit): echo a
            # bounded prefix, or each refusal costs a copy of it both ways.
            raise CallError(
                Status.UNIMPLEMENTED, f"Method not found: {path[:200].decode('latin-1')}"
            )
        if call.encoding not in (b"identity", b"gzip", b"deflate"):
            raise CallError(
                Status.UNIMPLEMENTED, f"unsupported grpc-encoding {call.encoding.decode()!r}"
            )
        return target


async def run(
    call: Call, target: Method, request: Message | bytes | RequestStream, dispatcher: Dispatcher
) -> None:
    """The handler's task: run it and end the stream with its status. A
    compressed request (bytes) is inflated here first, a step at a time."""
    conn = call.conn
    stream = call.stream
    context = Context(call)
    try:
        if isinstance(request, bytes):
            raw = await inflate(
                request,
                call.encoding,
                target.request_type,
                dispatcher.max_message_bytes,
                dispatcher.inflating,
            )
            request = parse(raw, target.request_type)
        result = target.handler(request, context)
        if inspect.isasyncgen(result):  # replies yielded, as grpc.aio allows
            async for reply in result:
                await context.write(reply)
            result = None
        else:
            result = await result
        if stream.done:
            return
        if not target.streaming:
            if result is None:
                conn.streams.finish(stream, Status.INTERNAL, "the handler returned no reply")
                return
            data = result.SerializeToString()
            await conn.sender.send_message(stream, GRPC_PREFIX.pack(0, len(data)) + data)
        conn.streams.finish(stream, Status.OK, "")
    except AbortError as exc:
        conn.streams.finish(stream, exc.code, exc.details)
    except CallError as exc:
        conn.streams.finish(stream, exc.code, exc.details)
        if isinstance(exc, Bomb):
            try:
                conn.flood.bomb()
            except ConnectionLevelError as calm:
                conn.fail(calm)
    except asyncio.CancelledError:
        if call.cancel_status is not None and not stream.done:
            conn.streams.finish(stream, *call.cancel_status)
        # else: the peer reset the stream or left; nobody to tell
    except Exception as exc:
        log.exception("unhandled error in %s", target.handler.__name__)
        conn.streams.finish(stream, Status.UNKNOWN, f"Unexpected {type(exc).__name__}")


def _path(stream: Stream) -> str:
    for key, value in stream.headers:
        if key == b":path":
            return value.decode("latin-1")
    return ""


def _current() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None
