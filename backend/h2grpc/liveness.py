"""The timers that decide how long one connection lives: the handshake timeout,
keepalive pings to find a vanished peer, paced PING ACKs, and the idle close."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sized
from typing import Protocol

from backend.h2grpc.frames import ACK, ENHANCE_YOUR_CALM, PING, ConnectionLevelError, frame

log = logging.getLogger(__name__)

# At most one PING ACK per this many seconds per connection; later pings are
# answered together when it has passed. grpc-go's BDP estimator (on in the
# gateway's default dial) sends a new ping with the first DATA frame after each
# ACK, i.e. one per streamed token when tokens are slower than the round trip;
# answering each at once makes every token cost a second wake-up here. With a
# 50 ms pace a client pings at most 20 times a second, and keepalive pings
# (seconds apart) are still answered at once.
PING_ACK_INTERVAL = 0.05
# PINGs waiting for their paced ACK, at most: more is a flood.
MAX_UNANSWERED_PINGS = 100
# Between the idle GOAWAY and the close, see Liveness._idle_check.
IDLE_CLOSE_GRACE = 1.0
# A keepalive check that runs this much later than it was due found the loop
# stalled (or the process starved): the peer's ACK may be read but not yet
# handled (libuv runs due timers before it polls the sockets), so the check
# looks again after the reads instead of closing.
KEEPALIVE_LATE = 1.0
KEEPALIVE_RECHECK = 0.1


class Host(Protocol):
    """What liveness needs of its connection (connection.Connection)."""

    @property
    def closing(self) -> bool: ...
    @property
    def preface_seen(self) -> bool: ...
    @property
    def peer(self) -> str: ...
    @property
    def streams(self) -> Sized: ...

    def write(self, data: bytes) -> None: ...
    def goaway(self) -> None: ...
    def close(self) -> None: ...
    def dropped(self, kind: str, message: str, *args: object) -> None: ...


class Timeouts(Protocol):
    """The server's settings liveness reads (server.Server)."""

    @property
    def handshake_timeout(self) -> float: ...
    @property
    def keepalive_time(self) -> float: ...
    @property
    def keepalive_timeout(self) -> float: ...
    @property
    def idle_timeout(self) -> float: ...


class Liveness:
    def __init__(self, conn: Host, timeouts: Timeouts) -> None:
        self.conn = conn
        self.timeouts = timeouts
        self.last_activity = time.monotonic()  # the last bytes from the peer
        self.idle_since = time.monotonic()  # when the last stream ended
        self.ping_outstanding = False  # our keepalive PING waits for its ACK
        self.ping_sent_at = 0.0
        self.keepalive_due = 0.0  # when the scheduled keepalive check should run
        self.last_ping_ack = -PING_ACK_INTERVAL
        self.ping_payloads: list[bytes] = []  # the peer's PINGs waiting for their ACK
        self.timers: dict[str, asyncio.TimerHandle] = {}

    def _later(self, name: str, delay: float, callback: Callable[[], object]) -> None:
        self.timers[name] = asyncio.get_running_loop().call_later(delay, callback)

    def start(self) -> None:
        server = self.timeouts
        self._later("preface", server.handshake_timeout, self._preface_expired)
        self._schedule_keepalive()
        if server.idle_timeout > 0:
            self._later("idle", server.idle_timeout, self._idle_check)

    def stop(self) -> None:
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()

    def _preface_expired(self) -> None:
        conn = self.conn
        if not conn.preface_seen:
            conn.dropped(
                "no_preface", "closing connection from %s: no HTTP/2 preface in time", conn.peer
            )
            conn.close()

    # ---- PING ------------------------------------------------------------------

    def on_ping(self, payload: bytes) -> None:
        """Answer the peer's PING now, or with the next paced batch."""
        now = time.monotonic()
        if "ack" not in self.timers and now - self.last_ping_ack >= PING_ACK_INTERVAL:
            self.last_ping_ack = now
            self.conn.write(frame(PING, ACK, 0, payload))
            return
        if len(self.ping_payloads) >= MAX_UNANSWERED_PINGS:
            raise ConnectionLevelError(ENHANCE_YOUR_CALM, "too many unanswered pings")
        self.ping_payloads.append(payload)
        if "ack" not in self.timers:
            self._later("ack", self.last_ping_ack + PING_ACK_INTERVAL - now, self._ack_pings)

    def _ack_pings(self) -> None:
        del self.timers["ack"]
        self.last_ping_ack = time.monotonic()
        self.conn.write(b"".join(frame(PING, ACK, 0, p) for p in self.ping_payloads))
        self.ping_payloads.clear()

    def on_ping_ack(self) -> None:
        self.ping_outstanding = False

    # ---- keepalive -------------------------------------------------------------

    def _schedule_keepalive(self, delay: float | None = None) -> None:
        keepalive_time = self.timeouts.keepalive_time
        if keepalive_time > 0 and not self.conn.closing:
            delay = keepalive_time if delay is None else delay
            self.keepalive_due = time.monotonic() + delay
            self._later("keepalive", delay, self._keepalive_check)

    def _keepalive_check(self) -> None:
        """Ping after keepalive_time of silence; close when nothing at all came
        from the peer for keepalive_timeout after the ping. A check that runs
        late looks again once the reads waiting meanwhile are handled."""
        conn = self.conn
        if conn.closing:
            return
        server = self.timeouts
        now = time.monotonic()
        if now - self.keepalive_due > KEEPALIVE_LATE:
            self._schedule_keepalive(KEEPALIVE_RECHECK)
            return
        if self.ping_outstanding:
            if self.last_activity > self.ping_sent_at:  # the peer is there
                self.ping_outstanding = False
            elif now - self.ping_sent_at >= server.keepalive_timeout:
                log.info("peer %s did not answer a keepalive ping: closing", conn.peer)
                conn.close()  # connection_lost follows and cancels the calls
                return
            else:
                self._schedule_keepalive(self.ping_sent_at + server.keepalive_timeout - now)
                return
        idle = now - self.last_activity
        if idle >= server.keepalive_time:
            self.ping_outstanding = True
            self.ping_sent_at = now
            conn.write(frame(PING, 0, 0, b"keepaliv"))
            self._schedule_keepalive(server.keepalive_timeout)
            return
        self._schedule_keepalive(server.keepalive_time - idle)

    # ---- idle ------------------------------------------------------------------

    def _idle_check(self) -> None:
        """GOAWAY(NO_ERROR) to a connection without streams for idle_timeout
        (grpc-go's MaxConnectionIdle), closed IDLE_CLOSE_GRACE later: a stream
        the peer opens meanwhile is refused (REFUSED_STREAM, which gRPC clients
        retry on a new connection), and the peer has time to read the GOAWAY
        before the close."""
        conn = self.conn
        if conn.closing:
            return
        timeout = self.timeouts.idle_timeout
        left = timeout - (time.monotonic() - self.idle_since)
        if conn.streams or left > 0:
            self._later("idle", left if left > 0 else timeout, self._idle_check)
            return
        log.info("closing HTTP/2 connection from %s: idle for %.0f s", conn.peer, timeout)
        conn.goaway()
        self._later("idle", IDLE_CLOSE_GRACE, conn.close)
