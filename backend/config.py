"""Process configuration, read once at start-up from the CLI and environment."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from backend.switches import switch

DEFAULT_ADDR = "127.0.0.1:50051"
TRANSPORTS = ("grpcio", "h2")  # backend/server.py: H2Server, GrpcioServer
# 64 MiB: a chat with a few base64 images fits; the gateway's own default
# client limit is of that order. Larger requests get RESOURCE_EXHAUSTED from grpc.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerConfig:
    addr: str = DEFAULT_ADDR
    auth_token: str | None = None
    parent_watch: bool = True
    parent_watch_interval: float = 2.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Requests admitted at once (generation + pooling); excess get
    # RESOURCE_EXHAUSTED at once instead of queueing without bound. 0 = no cap.
    max_concurrent_requests: int = 0
    # Exit the process when the engine dies (the gateway restarts us) instead
    # of reporting ERROR and waiting for a new LoadModel.
    exit_on_engine_death: bool = False
    # SIGTERM/SIGINT: seconds running requests get to end before the engine
    # stops; what still runs then ends UNAVAILABLE.
    grace_seconds: float = 10.0
    # Free / a replacing LoadModel: seconds running requests get to end before
    # the engine stops (0: stop at once); what still runs ends UNAVAILABLE.
    drain_seconds: float = 0.0
    log_level: str = "INFO"
    # Log request content (prompts, messages); off by default since prompts
    # may be private.
    debug_requests: bool = False
    # "uvloop" (the default when it is installed; vLLM depends on it) or
    # "asyncio". uvloop makes each streamed message cheaper (bench/results/README.md).
    event_loop: str = "uvloop"
    # "h2": our HTTP/2 gRPC server on the event loop (backend/h2grpc/), the
    # default: ~0.1x grpc.aio's CPU per streamed message, and it holds against
    # the hostile-peer suite (README "Transport"); or "grpcio": grpc.aio (C core).
    transport: str = "h2"
    # HOST:PORT of the Prometheus endpoint (backend/metrics.py); None = off.
    metrics_addr: str | None = None
    # A connection must send its HTTP/2 preface and SETTINGS within this many
    # seconds or it is closed (grpc.aio: server_handshake_timeout_ms, whose
    # default is 120 s).
    handshake_timeout: float = 10.0
    # A connection with no call open for this many seconds gets GOAWAY(NO_ERROR)
    # and is closed (grpc-go's MaxConnectionIdle; grpc.aio:
    # max_connection_idle_ms); 0 = never. Clients reconnect on their next call.
    idle_connection_s: float = 300.0
    # Connections served at once; more are closed as they arrive (grpc.aio:
    # max_allowed_incoming_connections); 0 = no cap.
    max_connections: int = 1024


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """Unset or empty: the default; else a word of backend/switches.py."""
    value = switch(env.get(name), empty=default)
    if value is None:
        raise SystemExit(f"{name}={env[name]!r}: use true/false (or 1/0, yes/no, on/off)")
    return value


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number") from None


def parse_config(argv: Sequence[str], env: Mapping[str, str] = os.environ) -> ServerConfig:
    """CLI flags win over environment variables; `--addr=X` and `--addr X` both work."""
    parser = argparse.ArgumentParser(prog="backend", description="vLLM gRPC backend worker")
    parser.add_argument(
        "--addr",
        default=env.get("BACKEND_ADDR", DEFAULT_ADDR),
        help="HOST:PORT to listen on (default loopback: binding elsewhere must be explicit)",
    )
    parser.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=int(_number(env, "BACKEND_MAX_CONCURRENT_REQUESTS", 0)),
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=int(_number(env, "BACKEND_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES)),
    )
    parser.add_argument(
        "--exit-on-engine-death",
        action=argparse.BooleanOptionalAction,
        default=_flag(env, "BACKEND_EXIT_ON_ENGINE_DEATH", False),
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=_number(env, "BACKEND_DRAIN_SECONDS", 0.0),
        help="Free / a replacing LoadModel wait this long for running requests (default 0)",
    )
    parser.add_argument("--log-level", default=env.get("BACKEND_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--debug-requests",
        action="store_true",
        default=_flag(env, "BACKEND_DEBUG_REQUESTS", False),
        help="log request content (prompts may be private)",
    )
    parser.add_argument(
        "--event-loop",
        choices=("auto", "uvloop", "asyncio"),
        default=env.get("BACKEND_EVENT_LOOP", "auto"),
        help="asyncio event loop implementation (auto: uvloop when installed)",
    )
    parser.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default=env.get("BACKEND_TRANSPORT", "h2"),
        help="gRPC server: h2 (HTTP/2 on the event loop, default) or grpcio (grpc.aio)",
    )
    parser.add_argument(
        "--metrics-addr",
        default=env.get("BACKEND_METRICS_ADDR") or None,
        help="serve Prometheus metrics over HTTP on HOST:PORT (a bare PORT: loopback; default off)",
    )
    args = parser.parse_args(list(argv))
    metrics_addr = None
    if args.metrics_addr:
        try:
            host, port = split_addr(args.metrics_addr)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        metrics_addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if args.transport not in TRANSPORTS:
        raise SystemExit(
            f"BACKEND_TRANSPORT={args.transport!r}: choose one of {', '.join(TRANSPORTS)}"
        )
    token = env.get("LOCALAI_GRPC_AUTH_TOKEN") or None
    return ServerConfig(
        addr=args.addr,
        auth_token=token,
        parent_watch=_flag(env, "LOCALAI_BACKEND_PARENT_WATCH", True),
        parent_watch_interval=max(0.1, _number(env, "LOCALAI_BACKEND_PARENT_WATCH_INTERVAL", 2.0)),
        max_message_bytes=args.max_message_bytes,
        max_concurrent_requests=max(0, args.max_concurrent_requests),
        exit_on_engine_death=args.exit_on_engine_death,
        grace_seconds=_number(env, "BACKEND_GRACE_SECONDS", 10.0),
        drain_seconds=max(0.0, args.drain_seconds),
        log_level=args.log_level.upper(),
        debug_requests=args.debug_requests,
        event_loop=_event_loop(args.event_loop),
        transport=args.transport,
        metrics_addr=metrics_addr,
        handshake_timeout=max(0.1, _number(env, "BACKEND_HANDSHAKE_TIMEOUT_S", 10.0)),
        idle_connection_s=max(0.0, _number(env, "BACKEND_IDLE_CONNECTION_S", 300.0)),
        max_connections=max(0, int(_number(env, "BACKEND_MAX_CONNECTIONS", 1024))),
    )


def split_addr(addr: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT`, `:PORT` or `PORT` → (host, port); loopback when no host."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = "", addr
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics address {addr!r}: expected HOST:PORT")
    return host, int(port)


def _event_loop(choice: str) -> str:
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("--event-loop uvloop: uvloop is not installed") from None
        return "asyncio"
    return "uvloop"
