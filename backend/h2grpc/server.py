"""The server: its settings, the listening sockets, the connection cap (which
evicts the connection idle longest to let a new one in), and a graceful stop.
The top layer: it wires a `calls.Dispatcher` into every `connection.Connection`
it accepts."""

from __future__ import annotations

import asyncio
import logging
import time

from backend.h2grpc.calls import Dispatcher, Method
from backend.h2grpc.connection import Connection
from backend.h2grpc.frames import Status
from backend.h2grpc.headers import HeaderBytes
from backend.h2grpc.inflow import RECV_WINDOW, RequestBytes
from backend.h2grpc.pace import Pacer

log = logging.getLogger(__name__)

# A peer decides how many connections it makes us drop (over the cap, no
# preface, a protocol error): at most one warning per kind per this many
# seconds, and the next one says how many were left unlogged.
DROP_LOG_INTERVAL = 10.0


class DropLog:
    """Connections dropped on the peer's account, counted by kind (all of them:
    the `backend_connections_dropped` metric) and warned about at a limited rate."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}  # kind -> drops since start-up
        self.logged: dict[str, float] = {}  # kind -> when its last warning went out
        self.unlogged: dict[str, int] = {}  # kind -> drops since then

    def warn(self, kind: str, message: str, *args: object) -> None:
        """`kind` must come from a small fixed set (not from the peer's bytes):
        "over_cap", "no_preface", or the HTTP/2 error code's name."""
        self.totals[kind] = self.totals.get(kind, 0) + 1
        now = time.monotonic()
        last = self.logged.get(kind)
        if last is not None:
            if now - last < DROP_LOG_INTERVAL:
                self.unlogged[kind] = self.unlogged.get(kind, 0) + 1
                return
            more = self.unlogged.pop(kind, 0)
            if more:
                message += f" ({more} more like it unlogged in the last {now - last:.0f} s)"
        self.logged[kind] = now
        log.warning(message, *args)


class Server:
    """Serves `methods` (see `calls.methods_of`) on one or more addresses."""

    def __init__(
        self,
        methods: dict[str, Method],
        *,
        auth_token: str | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
        max_concurrent_streams: int = 1000,
        keepalive_time: float = 30.0,
        keepalive_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        idle_timeout: float = 0.0,
        max_connections: int = 0,
        max_buffered_total: int = 0,
        auth_exempt: tuple[str, ...] = (),
        idle_calls: tuple[str, ...] = (),
    ) -> None:
        self.methods = methods
        self.calls = Dispatcher(methods, max_message_bytes, auth_token, auth_exempt, idle_calls)
        self.max_message_bytes = max_message_bytes
        # Request bytes one connection may hold in unfinished calls, and all
        # connections together (inflow.py).
        self.max_buffered = max_message_bytes + RECV_WINDOW
        self.request_bytes = RequestBytes(max_buffered_total or 4 * self.max_buffered)
        self.header_bytes = HeaderBytes()
        self.pacer = Pacer()
        self.max_concurrent_streams = max_concurrent_streams
        self.keepalive_time = keepalive_time
        self.keepalive_timeout = keepalive_timeout
        self.handshake_timeout = handshake_timeout  # for the client preface
        self.idle_timeout = idle_timeout  # no open stream that long: GOAWAY, close (0: never)
        self.max_connections = max_connections  # see admit (0: no cap)
        self.refused_connections = 0
        self.drops = DropLog()
        self.connections: set[Connection] = set()
        # Connections without a call running, the one idle longest first.
        self.idle: dict[Connection, None] = {}
        self.listeners: list[asyncio.Server] = []
        self.stopping = False

    def release(self, conn: Connection) -> None:
        """The connection is gone."""
        self.connections.discard(conn)
        self.idle.pop(conn, None)

    def busy(self, conn: Connection, busy: bool) -> None:
        """`conn` has a call running now, or (False) none any more."""
        if busy:
            self.idle.pop(conn, None)
        elif conn in self.connections:
            self.idle[conn] = None  # idle from now: the newest

    def admit(self, conn: Connection) -> bool:
        """Count a new connection in. At the cap, the connection idle longest
        (no call running; one that never sent its preface counts as idle) is
        evicted to make room: a full server still admits the gateway. Only
        when every connection has a call running (not counting `idle_calls`,
        health watches) is the newcomer refused."""
        if self.max_connections and len(self.connections) >= self.max_connections:
            victim = next(iter(self.idle), None)
            if victim is None:
                self.refused_connections += 1
                self.drops.warn(
                    "over_cap",
                    "%d connections open (the cap), each with a call running: closing new "
                    "ones (%d so far), latest from %s",
                    len(self.connections),
                    self.refused_connections,
                    conn.peer,
                )
                return False
            self.drops.warn(
                "evicted",
                "%d connections open (the cap): closing the one idle longest, from %s",
                len(self.connections),
                victim.peer,
            )
            self.release(victim)
            victim.evict()
        self.connections.add(conn)
        self.idle[conn] = None
        return True

    async def listen(self, addr: str) -> int:
        """Bind `host:port`, `[v6]:port` or `unix:/path`; returns the bound port (0 for unix)."""
        loop = asyncio.get_running_loop()
        if addr.startswith("unix:"):
            path = addr[5:].removeprefix("//")
            server = await loop.create_unix_server(lambda: Connection(self), path)
            self.listeners.append(server)
            return 0
        host, sep, port_text = addr.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"{addr!r} is not HOST:PORT")
        host = host.strip("[]") or None  # type: ignore[assignment]
        server = await loop.create_server(
            lambda: Connection(self), host, int(port_text), reuse_address=True, backlog=1024
        )
        self.listeners.append(server)
        sockets = server.sockets or ()
        return int(sockets[0].getsockname()[1]) if sockets else int(port_text)

    async def stop(self, grace: float) -> None:
        """Refuse new calls, let running ones finish for `grace` seconds, then
        end the rest with UNAVAILABLE (their handlers are cancelled)."""
        self.stopping = True
        for listener in self.listeners:
            listener.close()
        for conn in list(self.connections):
            conn.goaway()
        tasks = self.calls.tasks
        if tasks:
            _, late = await asyncio.wait(list(tasks), timeout=grace)
            for task in late:
                call = tasks.get(task)
                if call is not None:
                    call.cancel(Status.UNAVAILABLE, "Cancelling all calls")
            if late:
                await asyncio.wait(late, timeout=5.0)
        for conn in list(self.connections):
            conn.close()
        for listener in self.listeners:
            await listener.wait_closed()
