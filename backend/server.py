"""The gRPC server (h2grpc by default, grpc.aio on request): options, auth,
signals, parent watch and shutdown."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backend import reflection
from backend.config import ServerConfig
from backend.gen import backend_pb2
from backend.health import HealthService
from backend.servicer import BackendServicer, freeze_heap

log = logging.getLogger(__name__)


# Served without the token: Kubernetes' gRPC probes and load balancers cannot
# send one, and it tells no more than SERVING / NOT_SERVING.
AUTH_EXEMPT = ("/grpc.health.v1.Health/",)
# Calls that may run as long as the client likes without being work: on h2 they
# do not keep a connection from being evicted when the connection cap is
# reached (else a token-less peer holding a Watch on every connection would
# keep the gateway out).
IDLE_CALLS = ("/grpc.health.v1.Health/Watch", *reflection.PATHS)
# What reflection lists (besides itself): what the services are is public
# anyway (backend.proto); calls still need the token if set.
REFLECTED = (
    backend_pb2.DESCRIPTOR.services_by_name["Backend"].full_name,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC but AUTH_EXEMPT must carry `authorization: Bearer <token>`
    (constant-time check)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if details.method.startswith(AUTH_EXEMPT):
            return handler
        given = b""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                break
        if hmac.compare_digest(given, self._expected):
            return handler
        return _denied(handler)


def _denied(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    message = "missing or invalid authorization bearer token"

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    deserializer = handler.request_deserializer if handler else None
    serializer = handler.response_serializer if handler else None
    if handler is not None and handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=deserializer, response_serializer=serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        unary, request_deserializer=deserializer, response_serializer=serializer
    )


# Both transports. The gateway multiplexes many users over one connection; the
# default of 100 concurrent streams per connection would queue them in HTTP/2.
MAX_CONCURRENT_STREAMS = 1000
# Detect a vanished gateway connection (and so cancel its streams) within about
# a minute even when no data flows: ping after this much silence, give up when
# nothing came back for this long (grpc-go's default; 10 s closed a test
# client's connection during a LoadModel on a machine at load 50).
KEEPALIVE_TIME_S = 30
KEEPALIVE_TIMEOUT_S = 20


def server_options(config: ServerConfig) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_S * 1000),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
        ("grpc.server_handshake_timeout_ms", int(config.handshake_timeout * 1000)),
    ]
    if config.idle_connection_s:
        options.append(("grpc.max_connection_idle_ms", int(config.idle_connection_s * 1000)))
    if config.max_connections:
        options.append(("grpc.max_allowed_incoming_connections", config.max_connections))
    return options


class Stop:
    """Why the worker stops (a signal, parent death, engine death), set once."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.why = ""
        self.at = 0.0

    def set(self, why: str) -> None:
        if self.event.is_set():
            log.info("%s while already stopping (%s): ignored", why, self.why)
            return
        self.why, self.at = why, time.monotonic()
        self.event.set()


async def _watch_parent(parent: int, interval: float, stop: Stop) -> None:
    """Stop when we are re-parented: the gateway that started us has died."""
    while not stop.event.is_set():
        await asyncio.sleep(interval)
        if os.getppid() != parent:
            log.warning("parent process %d is gone: shutting down", parent)
            stop.set("parent process gone")


EXIT_ENGINE_DEATH = 3
# After the grace period: how long requests cut by the engine's stop have to
# send their UNAVAILABLE status before the transport cancels them.
SHUTDOWN_CUT_S = 5.0


def health_of(servicer: Any) -> HealthService:
    """grpc.health.v1.Health for `servicer`: SERVING while it has a model whose
    engine is alive."""

    def serving() -> bool:
        model = servicer.model
        return model is not None and not model.engine.errored

    return HealthService(serving)


def _decoding_handlers(servicer: Any) -> grpc.GenericRpcHandler:
    """backend.Backend's methods with the request decoded by us, not by grpc.

    When grpc.aio's own deserializer fails (e.g. invalid UTF-8 in a proto3
    string), it answers UNKNOWN "Unexpected <class DecodeError>" before our
    code runs; here the handler receives the bytes and a request that cannot be
    decoded gets INVALID_ARGUMENT naming the message type and the problem (as
    the h2 transport does)."""
    service = backend_pb2.DESCRIPTOR.services_by_name["Backend"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_cls = getattr(backend_pb2, method.input_type.name)
        response_cls = getattr(backend_pb2, method.output_type.name)
        impl = getattr(servicer, method.name)

        async def call(
            raw: bytes, context: grpc.aio.ServicerContext, impl: Any = impl, cls: Any = request_cls
        ) -> Any:
            try:
                request = cls.FromString(raw)
            except DecodeError as e:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the {cls.DESCRIPTOR.full_name} request cannot be decoded: {e} "
                    "(proto3 strings must be valid UTF-8)",
                )
            return await impl(request, context)

        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(call, response_serializer=response_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class GrpcioServer:
    """grpc.aio (C core) behind the same two calls as H2Server."""

    def __init__(self, config: ServerConfig, servicer: Any) -> None:
        interceptors = [AuthInterceptor(config.auth_token)] if config.auth_token else []
        self.server = grpc.aio.server(interceptors=interceptors, options=server_options(config))
        self.server.add_generic_rpc_handlers((_decoding_handlers(servicer),))
        self.health = health_of(servicer)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.server.add_generic_rpc_handlers(reflection.grpcio_handlers(REFLECTED))
        self.addr = config.addr

    async def listen(self) -> int:
        port = self.server.add_insecure_port(self.addr)
        if not port:
            raise SystemExit(f"cannot listen on {self.addr}")
        await self.server.start()
        return int(port)

    async def stop(self, grace: float) -> None:
        self.health.stopping = True
        await self.server.stop(grace)


class H2Server:
    """backend/h2grpc/: HTTP/2 on the event loop (the default: --transport h2)."""

    def __init__(self, config: ServerConfig, servicer: Any) -> None:
        from backend import h2grpc

        service = backend_pb2.DESCRIPTOR.services_by_name["Backend"]
        self.health = health_of(servicer)
        methods = h2grpc.methods_of(servicer, service)
        methods.update(
            h2grpc.methods_of(self.health, health_pb2.DESCRIPTOR.services_by_name["Health"])
        )
        methods.update(reflection.h2_methods(REFLECTED))
        self.server = h2grpc.Server(
            methods,
            auth_token=config.auth_token,
            max_message_bytes=config.max_message_bytes,
            max_concurrent_streams=MAX_CONCURRENT_STREAMS,
            keepalive_time=KEEPALIVE_TIME_S,
            keepalive_timeout=KEEPALIVE_TIMEOUT_S,
            handshake_timeout=config.handshake_timeout,
            idle_timeout=config.idle_connection_s,
            max_connections=config.max_connections,
            auth_exempt=AUTH_EXEMPT,
            idle_calls=IDLE_CALLS,
        )
        self.addr = config.addr

    async def listen(self) -> int:
        try:
            return await self.server.listen(self.addr)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"cannot listen on {self.addr}: {exc}") from None

    async def stop(self, grace: float) -> None:
        self.health.stopping = True
        await self.server.stop(grace)


def make_server(config: ServerConfig, servicer: Any) -> H2Server | GrpcioServer:
    """The transport config.transport names, serving `servicer` on config.addr."""
    return (H2Server if config.transport == "h2" else GrpcioServer)(config, servicer)


async def serve(config: ServerConfig) -> int:
    """Serve until SIGTERM/SIGINT, parent death or (if configured) engine
    death; returns the process exit code (3 after engine death, else 0)."""
    servicer = BackendServicer(config)
    server = make_server(config, servicer)
    freeze_heap()  # everything imported so far lives as long as the worker
    await server.listen()
    metrics_server = None
    if config.metrics_addr:
        from backend.metrics import MetricsServer

        if isinstance(server, H2Server):
            servicer.counters.count_dropped_connections(lambda: server.server.drops.totals)
        metrics_server = MetricsServer(config.metrics_addr, servicer.counters)
        metrics_server.start()

    stop = Stop()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set, sig.name)

    log.info(
        "listening on %s (transport %s, auth %s, max concurrent requests %s, event loop %s)",
        config.addr,
        config.transport,
        "on" if config.auth_token else "off",
        config.max_concurrent_requests or "unlimited",
        type(loop).__module__.split(".")[0],
    )

    exit_code = 0

    def on_engine_death() -> None:
        # The watcher has logged the death (one ERROR, with the cause and this exit).
        nonlocal exit_code
        if config.exit_on_engine_death:
            exit_code = EXIT_ENGINE_DEATH
            stop.set("engine death (exit_on_engine_death)")

    watchers = [asyncio.create_task(servicer.watch_engine(1.0, on_engine_death))]
    if config.parent_watch:
        watchers.append(
            asyncio.create_task(_watch_parent(os.getppid(), config.parent_watch_interval, stop))
        )
    try:
        await stop.event.wait()
    finally:
        why = stop.why or "shutdown"
        log.info(
            "%s: shutting down (grace %.1fs for %d running request(s))",
            why,
            config.grace_seconds,
            servicer.running,
        )
        for watcher in watchers:
            watcher.cancel()
        # Refuse new RPCs at once and let in-flight ones finish within the
        # grace period; then stop the engine, which ends what still runs with
        # UNAVAILABLE "shutting down" (never a reply that looks complete). The
        # transport cancels whatever has not ended SHUTDOWN_CUT_S later.
        stopping = asyncio.create_task(server.stop(config.grace_seconds + SHUTDOWN_CUT_S))
        await servicer.drain(config.grace_seconds)
        await servicer.close(why)
        await stopping
        if metrics_server is not None:
            metrics_server.stop()
        log.info("%s: stopped in %.1fs", why, time.monotonic() - (stop.at or time.monotonic()))
    return exit_code
