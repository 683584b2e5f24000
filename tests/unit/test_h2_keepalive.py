"""The h2 transport's keepalive: a peer that answers nothing is closed; a peer
that is there, or whose answer waits behind a stalled loop, is not."""

from __future__ import annotations

import asyncio
import time

from backend.h2grpc import liveness
from backend.h2grpc.frames import PING


class Host:
    closing = False
    preface_seen = True
    peer = "test-peer"

    def __init__(self) -> None:
        self.streams: dict[int, object] = {}
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def goaway(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
        self.closing = True

    def dropped(self, kind: str, message: str, *args: object) -> None:
        pass


class Timeouts:
    handshake_timeout = 60.0
    keepalive_time = 0.2
    keepalive_timeout = 0.3
    idle_timeout = 0.0


def _pings(host: Host) -> int:
    return sum(1 for d in host.written if d[3] == PING)


def _run(body) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(body())


async def _until(condition) -> bool:  # type: ignore[no-untyped-def]
    """Wait up to ~10 s for `condition`, polled every 10 ms (the liveness state
    has no event to wait on): the tests wait for what the timers do, not for
    fixed times, so a loaded machine delays them without changing their verdicts."""
    for _ in range(1000):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return bool(condition())


def test_a_silent_peer_is_pinged_then_closed() -> None:
    async def body() -> None:
        host = Host()
        live = liveness.Liveness(host, Timeouts())
        live.start()
        assert await _until(lambda: _pings(host) == 1)
        pinged = time.monotonic()
        assert not host.closed
        assert await _until(lambda: host.closed)
        # Never before keepalive_timeout after the ping (a loaded loop only makes it later).
        assert time.monotonic() - pinged >= Timeouts.keepalive_timeout - 0.02
        assert _pings(host) == 1

    _run(body)


def test_any_bytes_after_the_ping_keep_the_connection() -> None:
    async def body() -> None:
        host = Host()
        live = liveness.Liveness(host, Timeouts())
        live.start()
        assert await _until(lambda: _pings(host) == 1)
        live.last_activity = time.monotonic()  # what data_received does
        # The check at keepalive_timeout after the ping takes the bytes as the
        # answer: the connection stays, and is pinged again after its next
        # keepalive_time of silence (it would be closed instead).
        assert await _until(lambda: _pings(host) == 2 or host.closed)
        assert not host.closed

    _run(body)


def test_a_check_that_runs_late_looks_again_after_the_reads_instead_of_closing() -> None:
    """The loop stalled past the ACK's deadline (a blocking call, a starved
    process): the ACK is in the socket, handled after the due timer. The late
    check must let it be read; it closes only if still nothing came."""

    async def body() -> None:
        host = Host()
        live = liveness.Liveness(host, Timeouts())
        live.start()
        assert await _until(lambda: _pings(host) == 1)
        # The loop stalls, on purpose, until the ACK's check is over
        # KEEPALIVE_LATE overdue, however late the ping itself went out.
        stall = live.keepalive_due + liveness.KEEPALIVE_LATE + 0.3 - time.monotonic()
        time.sleep(stall)  # noqa: ASYNC251
        # The overdue check runs first when the loop resumes; the ACK's read
        # comes after it (libuv's order: due timers, then the sockets).
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, lambda: setattr(live, "last_activity", time.monotonic()))
        assert await _until(lambda: _pings(host) == 2 or host.closed)
        assert not host.closed

    _run(body)
