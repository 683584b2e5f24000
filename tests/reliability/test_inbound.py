"""Inbound attacks on the HTTP/2 transport, run against both transports.

One case per attack class (issues 11 and 23), each against a real worker
process (no model: the transport is what is attacked; Health is the probe).
Every attack is bounded by counts and bytes, not by time, so what it asks of
the worker does not depend on how fast this machine is; a deadline (GUARD_S)
only guards against a hang, and "the server stopped reading" is seen as a send
that makes no progress for STALL_S. Each case asserts

- the reaction the transport must show (GOAWAY with a code, RST_STREAM, an
  error status, closing, withholding flow-control window, or no longer
  reading);
- the worker is alive and its RSS grew by less than 256 MiB (sampled every
  20 ms during the attack and just after);
- Health from a second, well-behaved grpc client (its own process, so the
  attacker's Python does not delay it) is answered throughout the attack, every
  probe, the slowest within WORST_S, and OK within 2 s after it.

Time is measured where it is the point: the probe latencies. The worst probe
is the verdict, not the median: a stall of a second is a second in which the
gateway's Health poll and every other client's tokens stop.

Measurements (worst and median probe, failed probes, RSS growth, the worker's
CPU seconds) go to $INBOUND_REPORT (JSON lines) when set.

Where the transports differ, each case accepts what a sound server may do and
names it: C-core refuses streams under rapid reset (REFUSED_STREAM) where
h2grpc sends GOAWAY(ENHANCE_YOUR_CALM), and absorbs SETTINGS, WINDOW_UPDATE
and PRIORITY floods cheaply (the flooding connection must then still serve a
call) where h2grpc counts them (backend/h2grpc/flood.py). XFAIL lists, with
the measured symptom, what C-core does not do.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

import psutil
import pytest

from tests.conftest import Worker, retire
from tests.reliability import inbound_peer as p

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

MIB = 1 << 20
FLOOD_BYTES = 128 * MIB
FLOOD_FRAMES = 200_000
GUARD_S = 60.0  # a hang guard, never the bound of an attack
STALL_S = 3.0  # a send making no progress this long: the server stopped reading
RSS_LIMIT = 256 * MIB
MAX_MESSAGE = 64 * MIB  # the worker's default --max-message-bytes
# The worst Health probe during an attack, on this 2-core machine (issue 23).
WORST_S = 0.25
PROBE_TIMEOUT_S = 3.0
AFTER_S = 2.0

TRANSPORTS = ["grpcio", "h2"]


# ---- the well-behaved client ---------------------------------------------------


def _probe_loop(addr: str, pipe) -> None:  # runs in its own process
    import grpc

    from backend.gen import backend_pb2 as pb
    from backend.gen import backend_pb2_grpc

    stub = backend_pb2_grpc.BackendStub(grpc.insecure_channel(addr))
    stub.Health(pb.HealthMessage(), timeout=30)
    pipe.send("ready")
    while True:
        if pipe.recv() != "start":
            return
        out: list[float | None] = []
        # At least one probe, even when the worker ended the attack before the
        # first one could start (a fast machine: CI saw 0 probes once).
        while True:
            start = time.monotonic()
            try:
                ok = stub.Health(pb.HealthMessage(), timeout=PROBE_TIMEOUT_S).message == b"OK"
            except grpc.RpcError:
                ok = False
            out.append(time.monotonic() - start if ok else None)
            if pipe.poll():
                break
            time.sleep(0.02)
        pipe.recv()  # "stop"
        pipe.send(out)


class Prober:
    def __init__(self, addr: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_probe_loop, args=(addr, child), daemon=True)
        self.proc.start()
        assert self.pipe.poll(60) and self.pipe.recv() == "ready"

    def start(self) -> None:
        self.pipe.send("start")

    def stop(self) -> list[float | None]:
        self.pipe.send("stop")
        assert self.pipe.poll(PROBE_TIMEOUT_S + 5), "the prober hangs"
        return self.pipe.recv()

    def close(self) -> None:
        self.pipe.send("exit")
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(0.02):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak - self.base


@dataclass
class Box:
    transport: str
    worker: Worker
    prober: Prober


# The worker's connection cap here (default 1024): above idle_connections' 400
# and the two well-behaved clients, below what idle_connection_slots opens.
MAX_CONNECTIONS = 512
HANDSHAKE_S = 2.0


def _start(transport: str) -> Box:
    # A 2 s handshake timeout (default 10 s), so idle_connections can see it act.
    env = {
        "BACKEND_TRANSPORT": transport,
        "BACKEND_HANDSHAKE_TIMEOUT_S": str(HANDSHAKE_S),
        "BACKEND_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    }
    worker = Worker(env=env)
    return Box(transport, worker, Prober(worker.addr))


@pytest.fixture(scope="module")
def boxes(request) -> Iterator[dict[str, list[Box]]]:
    """A worker (and prober) for each transport the selected tests attack, all
    started before the first test: the tests' calls run alone (tests/conftest.py
    ALONE), and starting the second transport's worker between two of them kept
    the other test process waiting ~9 s. A test replaces its box's worker if an
    attack killed it."""
    params = [
        getattr(getattr(item, "callspec", None), "params", {})
        for item in request.session.items
        if item.module is request.module
    ]
    wanted = {given["box"] for given in params if "box" in given}
    started = {t: [_start(t)] for t in TRANSPORTS if t in wanted}
    yield started
    for holder in started.values():
        holder[0].prober.close()
        retire(holder[0].worker)


@pytest.fixture(scope="module", params=TRANSPORTS)
def box(request, boxes) -> list[Box]:
    return boxes[request.param]


# ---- attacks ---------------------------------------------------------------------
# Each takes the worker's address and a hang guard's deadline, attacks with a
# fixed amount of frames or bytes, asserts the reaction and returns it in words.


def _reacted_on(peer: p.Peer, sid: int) -> bool:
    return bool(peer.goaway or peer.eof or peer.resets.get(sid) or peer.status.get(sid, 0) != 0)


def flow_control_overrun(addr: str, deadline: float) -> str:
    """A message declared within the limit, then 128 MiB of DATA far beyond the
    granted windows on its stream."""
    peer = p.Peer(addr)
    peer.send(peer.headers(1) + p.frame(p.DATA, 0, 1, p.message(declared=MAX_MESSAGE // 2)))
    chunk = p.frame(p.DATA, 0, 1, bytes(16_384)) * 64  # 1 MiB
    sent = 0
    # On and on, even after the stream is reset: DATA past the window the
    # stream had when it ended is an overrun too.
    while sent < 128 * MIB and peer.send(chunk, deadline):  # C-core: +169 MiB RSS at 256
        sent += len(chunk)
        if peer.goaway:
            break
    peer.wait_while_talking(lambda: peer.goaway or 1 in peer.resets or peer.eof, silence=2)
    reaction = peer.reaction()
    code = peer.goaway[0] if peer.goaway else peer.resets.get(1)
    # RFC 9113 §6.9.1 says FLOW_CONTROL_ERROR; C-core resets the stream with
    # PROTOCOL_ERROR. Either way the overrun must end the stream or connection.
    assert code in (p.FLOW_CONTROL_ERROR, p.PROTOCOL_ERROR), reaction
    peer.close()
    return reaction


def beyond_declared(addr: str, deadline: float) -> str:
    """A message that declares 10 bytes, then up to 256 MiB of DATA within the windows."""
    peer = p.Peer(addr)
    peer.send(peer.headers(1))
    let_in = peer.send_data(1, 256 * MIB, deadline, first=p.message(declared=10), stall=STALL_S)
    reaction = peer.reaction() + f" accepted {let_in / MIB:.1f} MiB"
    # The stream must be refused, or the server must stop granting window once
    # it holds at most a message's worth.
    assert _reacted_on(peer, 1) or let_in <= MAX_MESSAGE + 16 * MIB, reaction
    peer.close()
    return reaction


def data_after_end_stream(addr: str, deadline: float) -> str:
    """A complete request, then up to 256 MiB of DATA on the same stream
    (connection window only)."""
    peer = p.Peer(addr)
    peer.send(peer.headers(1) + p.frame(p.DATA, p.END_STREAM, 1, p.message()))
    let_in = peer.send_data(1, 256 * MIB, deadline, stream_window=False, stall=STALL_S)
    peer.wait_while_talking(lambda: peer.goaway or 1 in peer.resets or peer.eof, silence=2)
    reaction = peer.reaction() + f" after {let_in / MIB:.1f} MiB"
    code = peer.goaway[0] if peer.goaway else peer.resets.get(1)
    assert code in (p.STREAM_CLOSED, p.PROTOCOL_ERROR) or peer.eof, reaction
    peer.close()
    return reaction


def unread_pile(addr: str, deadline: float) -> str:
    """200 streams, each with a 1 MiB message (within the limit) and no
    END_STREAM: requests the worker cannot finish, piling up."""
    peer = p.Peer(addr)
    let_in = 0
    for sid in range(1, 2 * 200, 2):  # 200 MiB: beyond any per-connection allowance
        if not peer.send(peer.headers(sid), deadline):
            break
        # A stream the server no longer grants window to is given up at once.
        let_in += peer.send_data(sid, MIB + 5, deadline, first=p.message(declared=MIB), stall=0.05)

    def held() -> int:  # accepted, but neither answered nor refused
        return sum(
            n
            for sid, n in list(peer.stream_sent.items())
            if sid not in peer.ended and sid not in peer.resets and sid not in peer.status
        )

    # Calls already received may still be running: give them a moment.
    peer.wait(lambda: held() <= 128 * MIB, 2)
    reaction = peer.reaction() + f" accepted {let_in / MIB:.0f} MiB, held {held() / MIB:.0f} MiB"
    # What one connection can make the worker hold must be bounded (the
    # server answers the calls, refuses them, or stops granting window).
    assert peer.goaway or peer.eof or held() <= 128 * MIB, reaction
    peer.close()
    return reaction


def rapid_reset(addr: str, deadline: float) -> str:
    """20,000 HEADERS, each followed by RST_STREAM(CANCEL) (CVE-2023-44487)."""
    peer = p.Peer(addr)
    sid = 1
    while sid < 2 * 20_000 and not (peer.goaway or peer.eof):
        batch = bytearray()
        for _ in range(200):
            batch += peer.headers(sid, flags=p.END_HEADERS)
            batch += p.frame(p.RST_STREAM, 0, sid, (8).to_bytes(4, "big"))
            sid += 2
        if not peer.send(bytes(batch), deadline):
            break
    opened = sid // 2

    def count_refused() -> int:
        return sum(code == p.REFUSED_STREAM for code in list(peer.resets.values()))

    # Each stream's answer is parsed here in Python: wait while the server talks.
    peer.wait_while_talking(lambda: _calm(peer) or count_refused() >= opened // 2, silence=1)
    refused = count_refused()
    reaction = peer.reaction() + f" after {opened} streams"
    # GOAWAY(ENHANCE_YOUR_CALM) as nghttp2/grpc-go do, or C-core's answer:
    # refusing new streams while too many resets are pending (how many
    # depends on timing: 3,981 to 14,875 of 20,000 measured).
    assert _calm(peer) or refused > 0, reaction
    peer.close()
    return reaction


def _calm(peer: p.Peer) -> bool:
    return bool((peer.goaway and peer.goaway[0] == p.ENHANCE_YOUR_CALM) or peer.eof)


def _flood(setup: Callable[[p.Peer], bytes], unit: Callable[[int], bytes]):
    def attack(addr: str, deadline: float) -> str:
        peer = p.Peer(addr)
        peer.send(setup(peer))
        batch = b"".join(unit(i) for i in range(2000))
        frames = 0
        # FLOOD_FRAMES frames, and at most 128 MiB: C-core absorbs some
        # floods, and its RSS grew with the volume (+152 MiB after 442 MB of
        # WINDOW_UPDATE frames, 34 million in 3 s; +21-38 MiB after 11 million).
        while (
            frames < FLOOD_FRAMES
            and not (peer.goaway or peer.eof)
            and frames * len(batch) // 2000 < FLOOD_BYTES
        ):
            if not peer.send(batch, deadline):
                break
            frames += 2000
        # The server's answer to the flood (an ACK each for some kinds) comes
        # before any GOAWAY: wait while it talks, not for a fixed time.
        peer.wait_while_talking(lambda: peer.goaway or peer.eof, silence=1)
        sid = 1_000_001
        if not _calm(peer):
            # Absorbed instead of refused (C-core does that for some kinds): the
            # connection must still serve a call right after the flood.
            peer.send(peer.headers(sid) + p.frame(p.DATA, p.END_STREAM, sid, p.message()))
            peer.wait_while_talking(
                lambda: peer.status.get(sid) == 0 or peer.goaway or peer.eof, silence=10
            )
        reaction = peer.reaction() + f" after {frames} frames"
        if not _calm(peer):
            answered = peer.status.get(sid) == 0
            reaction += ", absorbed: the flooding connection still serves" if answered else ""
            assert answered, reaction + ", and the connection no longer serves"
        peer.close()
        return reaction

    return attack


flood_continuation = _flood(
    lambda peer: p.frame(p.HEADERS, 0, 1, peer.encoder.encode(p.request_headers())),
    lambda i: p.frame(p.CONTINUATION, 0, 1),
)
flood_empty_data = _flood(lambda peer: peer.headers(1), lambda i: p.frame(p.DATA, 0, 1))
flood_settings = _flood(lambda peer: b"", lambda i: p.frame(p.SETTINGS, 0, 0))
flood_window_update = _flood(
    lambda peer: b"", lambda i: p.frame(p.WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big"))
)
flood_priority = _flood(
    lambda peer: b"", lambda i: p.frame(p.PRIORITY, 0, 2 * i + 1, bytes(4) + b"\x10")
)
flood_ping = _flood(lambda peer: b"", lambda i: p.frame(p.PING, 0, 0, i.to_bytes(8, "big")))


def _send_until_stalled(peer: p.Peer, batches: Iterator[bytes]) -> tuple[int, int]:
    """Send each batch until one makes no progress for STALL_S (the server
    stopped reading) or the connection is gone: (batches sent, bytes sent)."""
    n = 0
    for batch in batches:
        before = peer.sent
        if not peer.send(batch, time.monotonic() + STALL_S):
            return n, peer.sent - before
        n += 1
    return n, 0


def never_reads(addr: str, deadline: float) -> str:
    """10,000 requests whose replies can be ~700 times their size (a 3.8 KiB path,
    HPACK-indexed once, then named in 1 byte; unknown methods are answered at
    once, the path echoed in grpc-message by some servers), never reading a
    byte of the replies. (No PINGs: both transports answer a PING flood with
    GOAWAY, see flood_ping.)"""
    peer = p.Peer(addr, read=False)
    path = "/backend.Backend/" + "x" * 3800  # fits the 4096-byte HPACK table
    first = peer.encoder.encode(p.request_headers(path=path))  # indexes every field
    again = peer.encoder.encode(p.request_headers(path=path))  # all indexed now
    peer.send(p.frame(p.HEADERS, p.END_HEADERS | p.END_STREAM, 1, first))

    def batches() -> Iterator[bytes]:
        for sid in range(3, 20_001, 1000):
            yield b"".join(
                p.frame(p.HEADERS, p.END_HEADERS | p.END_STREAM, sid + 2 * i, again)
                for i in range(500)
            )

    sent, _ = _send_until_stalled(peer, batches())
    state = "closed" if peer.eof else "stopped reading" if sent < 20 else "read all"
    reaction = f"{state} after {1 + 500 * sent} of 10000 requests never read"
    # What must hold is memory (asserted by the caller): the replies the
    # server keeps for a peer that does not read stay bounded.
    peer.close()
    return reaction


def requests_never_read(addr: str, deadline: float) -> str:
    """440,000 Health requests (HPACK-indexed: ~28 bytes each, 12 MiB), never
    reading a reply: the worker must stop reading (or close) long before."""
    total, per = 440_000, 1000
    peer = p.Peer(addr, read=False)
    peer.send(peer.headers(1) + p.frame(p.DATA, p.END_STREAM, 1, p.message()))

    def batches() -> Iterator[bytes]:
        for start in range(3, 2 * total, 2 * per):
            out = bytearray()
            for sid in range(start, start + 2 * per, 2):
                out += peer.headers(sid) + p.frame(p.DATA, p.END_STREAM, sid, p.message())
            yield bytes(out)

    sent, _ = _send_until_stalled(peer, batches())
    taken = 1 + sent * per
    state = "closed" if peer.eof else "stopped reading" if taken < total else "read all"
    reaction = f"{state} after {taken} of {total} requests"
    assert peer.eof or taken < total, reaction
    peer.close()
    return reaction


def reset_flood_never_reading(addr: str, deadline: float) -> str:
    """1,000 streams opened and left open (the most SETTINGS allows), then
    200,000 HEADERS beyond them, each refused (RST_STREAM(REFUSED_STREAM)),
    never reading a byte."""
    total, per = 200_000, 1000
    peer = p.Peer(addr, read=False)
    opened = b"".join(peer.headers(sid) for sid in range(1, 2000, 2))
    peer.send(opened)

    def batches() -> Iterator[bytes]:
        for start in range(2001, 2001 + 2 * total, 2 * per):
            yield b"".join(
                peer.headers(sid, flags=p.END_HEADERS | p.END_STREAM)
                for sid in range(start, start + 2 * per, 2)
            )

    sent, _ = _send_until_stalled(peer, batches())
    taken = sent * per
    state = "closed" if peer.eof else "stopped reading" if taken < total else "read all"
    reaction = f"{state} after {taken} of {total} refused streams"
    assert peer.eof or taken < total, reaction
    peer.close()
    return reaction


@cache
def _gzip_bomb() -> bytes:
    """64 MiB of zeros, gzipped: ~64 KiB."""
    return gzip.compress(bytes(MAX_MESSAGE), compresslevel=9)


def gzip_bomb_flood(addr: str, deadline: float) -> str:
    """100 gzip messages of ~64 KiB on one connection, each inflating to the
    64 MiB message limit (6.4 MiB sent, 6.4 GiB to inflate)."""
    bomb = struct.pack(">BI", 1, len(_gzip_bomb())) + _gzip_bomb()
    peer = p.Peer(addr)
    sids = list(range(1, 200, 2))
    for sid in sids:
        if not peer.send(peer.headers(sid, extra=(("grpc-encoding", "gzip"),)), deadline):
            break
        if peer.send_data(sid, len(bomb), deadline, first=bomb, stall=STALL_S) < len(bomb):
            break
        peer.send(p.frame(p.DATA, p.END_STREAM, sid), deadline)
    answered = lambda: sum(sid in peer.status for sid in sids)  # noqa: E731
    peer.wait_while_talking(lambda: _calm(peer) or answered() == len(sids), silence=5)
    reaction = peer.reaction() + f", {answered()} of {len(sids)} answered"
    # Each bomb ends its call with an error (none is served), or the
    # connection is closed for sending them.
    assert _calm(peer) or answered() == len(sids), reaction
    assert all(peer.status[s] != 0 for s in sids if s in peer.status), reaction
    peer.close()
    return reaction


def held_headers(addr: str, deadline: float) -> str:
    """4,000 requests left unfinished after their HEADERS (no END_STREAM, no
    DATA), so their decoded headers stay: 2,000 of issue 23's shape (a ~2 KB
    block of 1,950 indexed fields) on 2 connections, then 2,000 within 16 KiB
    and 64 fields (56 fields, ~15 KiB decoded from ~60 bytes, HPACK-indexed)
    on 40."""
    wide = [p.Peer(addr) for _ in range(2)]
    for peer in wide:
        frames = bytearray()
        for sid in range(1, 2000, 2):  # the request's fields indexed after the first
            block = peer.encoder.encode(p.request_headers()) + b"\x82" * 1950  # :method GET
            frames += p.frame(p.HEADERS, p.END_HEADERS, sid, block)
        peer.send(bytes(frames), deadline)
    values = tuple((f"x-held-{i}", chr(97 + i) * 250) for i in range(4))
    fields = p.request_headers(extra=tuple(values[i % 4] for i in range(50)))
    deep = [p.Peer(addr) for _ in range(40)]
    for peer in deep:
        frames = bytearray()
        for sid in range(1, 100, 2):
            frames += p.frame(p.HEADERS, p.END_HEADERS, sid, peer.encoder.encode(fields))
        peer.send(bytes(frames), deadline)
    p.wait_all_while_talking(wide + deep, lambda peer: peer.goaway or peer.eof, silence=1, limit=5)

    def ended(peer: p.Peer) -> int:
        with peer.cv:
            return len(set(peer.resets) | {s for s, code in peer.status.items() if code})

    refused = sum(ended(peer) for peer in deep)
    reaction = " | ".join(sorted({peer.reaction() for peer in wide}))
    reaction += f"; within the limits: {refused} of 2000 ended by the server"
    for peer in wide + deep:
        peer.close()
    return reaction


def settings_amplification(addr: str, deadline: float) -> str:
    """999 streams left open, then 40 SETTINGS frames of 2,730
    INITIAL_WINDOW_SIZE entries each (640 KiB): 109 million stream-window
    updates for a server that visits every stream per entry. The connection
    must then still serve a call (its 1,000th stream, the most it may open)."""
    peer = p.Peer(addr)
    peer.send(b"".join(peer.headers(sid) for sid in range(1, 1999, 2)), deadline)
    entries = b"".join(struct.pack(">HI", 4, 65_535 + i % 2) for i in range(2730))
    peer.send(p.frame(p.SETTINGS, 0, 0, entries) * 40, deadline)
    peer.wait_while_talking(lambda: peer.settings_acks >= 41 or peer.goaway or peer.eof, 2)
    sid = 1999
    peer.send(peer.headers(sid) + p.frame(p.DATA, p.END_STREAM, sid, p.message()), deadline)
    peer.wait_while_talking(lambda: sid in peer.status or peer.goaway or peer.eof, silence=5)
    reaction = peer.reaction() + f", {peer.settings_acks - 1} of 40 SETTINGS acknowledged"
    assert peer.status.get(sid) == 0 or _calm(peer), reaction + ", no answer after"
    peer.close()
    return reaction


def _violation(build: Callable[[p.Peer], bytes], check: Callable[[p.Peer], bool]):
    def attack(addr: str, deadline: float) -> str:
        peer = p.Peer(addr)
        peer.send(build(peer))
        peer.wait(lambda: check(peer), 2)
        reaction = peer.reaction()
        assert check(peer), reaction
        peer.close()
        return reaction

    return attack


def _goaway(*codes: int) -> Callable[[p.Peer], bool]:
    return lambda peer: peer.goaway is not None and peer.goaway[0] in codes


def _refused(sid: int) -> Callable[[p.Peer], bool]:
    """Stream error or connection error: RST_STREAM(non-zero), GOAWAY(error), or a
    non-OK status without running the handler."""
    return lambda peer: bool(
        (peer.goaway and peer.goaway[0])
        or peer.resets.get(sid)
        or peer.status.get(sid, 0) not in (0,)
    )


idle_stream_frame = _violation(lambda peer: p.frame(p.DATA, 0, 99, b"x"), _goaway(p.PROTOCOL_ERROR))
stream_id_regression = _violation(
    lambda peer: (
        peer.headers(5, flags=p.END_HEADERS) + peer.headers(3, flags=p.END_HEADERS | p.END_STREAM)
    ),
    _goaway(p.PROTOCOL_ERROR),
)
window_overflow = _violation(
    lambda peer: peer.headers(1) + p.frame(p.WINDOW_UPDATE, 0, 1, (2**31 - 1).to_bytes(4, "big")),
    lambda peer: peer.resets.get(1) == p.FLOW_CONTROL_ERROR or _goaway(p.FLOW_CONTROL_ERROR)(peer),
)
bad_pseudo_headers = _violation(
    lambda peer: (
        peer.headers(1, flags=p.END_HEADERS | p.END_STREAM, drop=(":path",))
        + peer.headers(3, flags=p.END_HEADERS | p.END_STREAM, extra=((":bogus", "1"),))
    ),
    lambda peer: _refused(1)(peer) and _refused(3)(peer),
)
bad_te = _violation(
    lambda peer: (
        peer.headers(1, replace={"te": "gzip"}) + p.frame(p.DATA, p.END_STREAM, 1, p.message())
    ),
    _refused(1),
)
bad_content_type = _violation(
    lambda peer: (
        peer.headers(1, replace={"content-type": "application/grpcx"})
        + p.frame(p.DATA, p.END_STREAM, 1, p.message())
    ),
    _refused(1),
)
empty_padded_headers = _violation(
    lambda peer: p.frame(p.HEADERS, p.END_HEADERS | p.PADDED, 1),
    _goaway(p.PROTOCOL_ERROR, 6),  # FRAME_SIZE_ERROR is fine too
)


def idle_connections(addr: str, deadline: float) -> str:
    """200 connections that never finish the preface, 200 that send it and go
    quiet, held past the worker's 2 s handshake timeout (the time is the point)."""
    half = [p.Peer(addr, preface=False) for _ in range(200)]
    for peer in half:
        peer.send(p.PREFACE[:10])
    quiet = [p.Peer(addr) for _ in range(200)]
    until = time.monotonic() + HANDSHAKE_S + 3  # the timeout plus scheduling slack
    for peer in half:
        peer.wait(lambda peer=peer: peer.eof, max(0.0, until - time.monotonic()))
    closed_half = sum(peer.eof for peer in half)
    closed_quiet = sum(peer.eof for peer in quiet)
    for peer in half + quiet:
        peer.close()
    reaction = f"closed {closed_half}/200 half-preface, {closed_quiet}/200 quiet"
    # A peer that never finishes the preface is dropped after the handshake
    # timeout (2 s here); idle-but-valid connections are kept (gateways pool
    # them; keepalive detects dead ones).
    assert closed_half >= 190, reaction
    return reaction


def _hello(addr: str) -> socket.socket | None:
    """A connection that sent its preface and has the server's first bytes
    (so the server has accepted it: not one waiting in the listen backlog)."""
    host, port = addr.rsplit(":", 1)
    try:
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(p.PREFACE + p.frame(p.SETTINGS, 0, 0))
        sock.recv(9, socket.MSG_PEEK)  # SETTINGS (and maybe GOAWAY) stay to be read
    except OSError:
        return None  # not even accepted by the kernel, or closed at once
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        while sock.recv(65536):  # our SETTINGS (and GOAWAY) first
            pass
        return True  # end of stream: the server closed it
    except BlockingIOError:
        return False  # open: nothing more to read
    except OSError:
        return True  # reset by the server


def _new_client_health(addr: str) -> float:
    """A client connecting now: Health's latency, or inf when refused. Its own
    subchannel pool: else grpc reuses this process's connection to the worker."""
    import grpc

    from backend.gen import backend_pb2 as pb
    from backend.gen import backend_pb2_grpc

    with grpc.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        start = time.monotonic()
        try:
            stub = backend_pb2_grpc.BackendStub(channel)
            ok = stub.Health(pb.HealthMessage(), timeout=PROBE_TIMEOUT_S).message == b"OK"
        except grpc.RpcError:
            ok = False
        return time.monotonic() - start if ok else float("inf")


def idle_connection_slots(addr: str, deadline: float) -> str:
    """2,000 connections (4 times the cap), each a valid preface then idle, all
    held open; while they are, a new client connects and calls Health."""
    socks = [s for s in (_hello(addr) for _ in range(2000)) if s is not None]
    try:
        took = _new_client_health(addr)
        closed = sum(_closed_by_server(sock) for sock in socks)
    finally:
        for sock in socks:
            sock.close()
    reaction = (
        f"{closed} of 2000 closed, {len(socks) - closed} kept (cap {MAX_CONNECTIONS}); "
        f"a new client's Health: {'refused' if took == float('inf') else f'{took * 1000:.0f} ms'}"
    )
    assert len(socks) - closed <= MAX_CONNECTIONS, reaction
    assert took < float("inf"), reaction
    return reaction


def hpack_bomb(addr: str, deadline: float) -> str:
    """A 4 KiB header inserted once, then referenced 16000 times (64 MiB of
    decoded headers from a 16 KiB block), on 20 connections."""
    value = b"v" * 4000
    # literal with incremental indexing, new name; value length 4000 = 127 + 3873
    # (HPACK integer: 0x7f, then 3873 in 7-bit groups, low first: 0xa1 0x1e)
    literal = b"\x40\x06x-bomb\x7f\xa1\x1e" + value
    reactions = set()
    for _ in range(20):
        peer = p.Peer(addr)
        block = peer.encoder.encode(p.request_headers()) + literal + b"\xbe" * 16_000
        frames = p.frame(p.HEADERS, 0, 1, block[:16_000])
        rest = block[16_000:]
        while rest:
            part, rest = rest[:16_000], rest[16_000:]
            frames += p.frame(p.CONTINUATION, 0 if rest else p.END_HEADERS, 1, part)
        peer.send(frames + p.frame(p.DATA, p.END_STREAM, 1, p.message()))
        peer.wait(lambda peer=peer: _refused(1)(peer) or peer.eof, 2)
        reaction = peer.reaction()
        assert _refused(1)(peer) or peer.eof, reaction
        reactions.add(reaction)
        peer.close()
    return " | ".join(sorted(reactions)) + " on 20 connections"


@dataclass(frozen=True)
class Case:
    name: str
    attack: Callable[[str, float], str]
    # A transport whose way to meet the bounds is not the reaction the attack
    # asserts: the reason (the wrong reaction is still reported).
    other_way: tuple[tuple[str, str], ...] = ()


# C-core keeps reading a peer that reads nothing and refuses the streams it
# cannot serve (measured: 440,000 requests and 200,000 refused streams read,
# +3 MiB RSS, 0.5 s / 0.2 s of CPU, worst probe 140 ms / 77 ms): bounded, by
# another way than h2grpc's (stop reading, or GOAWAY for the refusals).
READS_ON = (("grpcio", "C-core reads on and refuses what it cannot serve"),)


CASES = [
    Case("flow_control_overrun", flow_control_overrun),
    Case("beyond_declared", beyond_declared),
    Case("data_after_end_stream", data_after_end_stream),
    Case("unread_pile", unread_pile),
    Case("rapid_reset", rapid_reset),
    Case("flood_continuation", flood_continuation),
    Case("flood_empty_data", flood_empty_data),
    Case("flood_settings", flood_settings),
    Case("flood_window_update", flood_window_update),
    Case("flood_priority", flood_priority),
    Case("flood_ping", flood_ping),
    Case("never_reads", never_reads),
    Case("requests_never_read", requests_never_read, READS_ON),
    Case("reset_flood_never_reading", reset_flood_never_reading, READS_ON),
    Case("gzip_bomb_flood", gzip_bomb_flood),
    Case("held_headers", held_headers),
    Case("settings_amplification", settings_amplification),
    Case("idle_stream_frame", idle_stream_frame),
    Case("stream_id_regression", stream_id_regression),
    Case("window_overflow", window_overflow),
    Case("bad_pseudo_headers", bad_pseudo_headers),
    Case("bad_te", bad_te),
    Case("bad_content_type", bad_content_type),
    Case("empty_padded_headers", empty_padded_headers),
    Case("idle_connections", idle_connections),
    Case("hpack_bomb", hpack_bomb),
    Case("idle_connection_slots", idle_connection_slots),
]

# (transport, case) -> measured reason: what the transport does not survive.
XFAIL: dict[tuple[str, str], str] = {
    ("grpcio", "idle_stream_frame"): "C-core ignores DATA on an idle stream (measured: no "
    "reaction in 2 s; RFC 9113 §5.1 wants GOAWAY(PROTOCOL_ERROR)); nothing is buffered",
    ("grpcio", "stream_id_regression"): "C-core ignores HEADERS on a stream id lower than "
    "the last one (measured: no reaction in 2 s; RFC 9113 §5.1.1: PROTOCOL_ERROR)",
    ("grpcio", "window_overflow"): "C-core does not reset a stream whose send window a "
    "WINDOW_UPDATE overflows (measured: no reaction in 2 s; RFC 9113 §6.9.1)",
    ("grpcio", "bad_content_type"): "C-core serves content-type application/grpcx as gRPC "
    "(measured: prefix match, answered OK)",
    ("grpcio", "empty_padded_headers"): "C-core answers RST_STREAM(INTERNAL_ERROR), a stream "
    "error, where RFC 9113 §4.2/§6.2 want a connection error (measured)",
    ("grpcio", "idle_connection_slots"): "C-core refuses every new connection once "
    "grpc.max_allowed_incoming_connections are open, idle or not; it cannot evict one "
    "(measured: 510 idle attacker connections kept, the new client's Health refused)",
}
# C-core's failures that do not happen every time (they depend on how fast it
# works, or on its timing), so not strict: it may pass.
XFAIL_SLOW: dict[tuple[str, str], str] = {
    ("grpcio", "data_after_end_stream"): "C-core does not always react to DATA sent after "
    "END_STREAM (RFC 9113 §5.1: STREAM_CLOSED). 7 runs alone: RST_STREAM(PROTOCOL_ERROR) after "
    "0.1-5.6 MiB (3), connection closed after 26-95 MiB (2), and twice it read all 256 MiB, "
    "granting window, without a reaction (+4-5 MiB RSS, 0.2 s of worker CPU, probes 1 ms); "
    "nothing is held",
    ("grpcio", "gzip_bomb_flood"): "C-core inflates every message to the 64 MiB limit and "
    "the 100 calls end CANCELLED (measured: 11.9 s of worker CPU, +274 MiB RSS, 10 of 11 "
    "Health probes failed, the one answered after 2.2 s)",
    ("grpcio", "held_headers"): "C-core decodes and keeps the header blocks of 4,000 "
    "unfinished requests (measured: worst Health probe 1.4 s, +36 MiB RSS)",
    ("grpcio", "rapid_reset"): "C-core's Health answers slow down under 20,000 rapid resets "
    "by how fast the machine is, not by a limit: worst probe 88-140 ms in 4 runs alone, "
    "339 ms (3 probes, p50 60 ms) in a fresh-clone suite run on a slow hour, against the "
    "250 ms bound; it refuses the streams (REFUSED_STREAM) and holds nothing (+0.1 MiB RSS)",
}

# Cells only make test-all runs (tests/conftest.py marks them `long`), with why.
LONG_CELLS = {
    "test_inbound_attack[grpcio-gzip_bomb_flood]": "a non-strict xfail (C-core's known "
    "failure, XFAIL_SLOW above) that cannot change make test's verdict, and 26-31 s of it "
    "with the other test process waiting; h2's cell, the default transport's, stays",
}


def _health_after(worker: Worker) -> float:
    import grpc

    from backend.gen import backend_pb2 as pb

    start = time.monotonic()
    while time.monotonic() - start < 10:
        try:
            if worker.stub.Health(pb.HealthMessage(), timeout=1).message == b"OK":
                return time.monotonic() - start
        except grpc.RpcError:
            time.sleep(0.05)
    return float("inf")


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


@pytest.mark.parametrize("case", [c for c in CASES], ids=[c.name for c in CASES])
def test_inbound_attack(case: Case, box, request) -> None:
    target_box = box[0]
    if target_box.worker.proc.poll() is not None:
        target_box.prober.close()
        target_box.worker.stop()
        box[0] = target_box = _start(target_box.transport)
    transport = target_box.transport
    reason = XFAIL.get((transport, case.name))
    if reason:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=reason))
    slow = XFAIL_SLOW.get((transport, case.name))
    if slow:
        request.node.add_marker(pytest.mark.xfail(strict=False, reason=slow))
    worker = target_box.worker
    if case.name == "gzip_bomb_flood":
        _gzip_bomb()  # built before the clock starts
    rss = RssSampler(worker.proc.pid)
    cpu = _cpu(worker.proc.pid)
    target_box.prober.start()
    error: BaseException | None = None
    reaction = "?"
    try:
        reaction = case.attack(worker.addr, time.monotonic() + GUARD_S)
    except AssertionError as exc:  # the reaction was wrong: still measure the rest
        other = dict(case.other_way).get(transport)
        error = None if other else exc
        reaction = f"{other}: {exc}" if other else f"WRONG: {exc}"
    finally:  # whatever the attack raised, the prober must not stay started
        latencies = target_box.prober.stop()
    after = _health_after(worker) if worker.proc.poll() is None else float("inf")
    time.sleep(0.2)
    grew = rss.stop()
    used = _cpu(worker.proc.pid) - cpu if worker.proc.poll() is None else float("nan")
    answered = [x for x in latencies if x is not None]
    p50 = statistics.median(answered) if answered else float("inf")
    worst = max(answered) if answered else float("inf")
    result = {
        "transport": transport,
        "case": case.name,
        "reaction": reaction,
        "rss_mib": round(grew / MIB, 1),
        "worker_cpu_s": round(used, 2),
        "probes": len(latencies),
        "failed_probes": len(latencies) - len(answered),
        "p50_ms": round(p50 * 1000, 1),
        "max_ms": round(worst * 1000, 1),
        "after_s": round(after, 2),
        "alive": worker.proc.poll() is None,
    }
    print(json.dumps(result))
    if os.environ.get("INBOUND_REPORT"):
        with open(os.environ["INBOUND_REPORT"], "a") as f:
            f.write(json.dumps(result) + "\n")
    assert result["alive"], f"the worker died: {worker.log_tail()}"
    if error is not None:
        raise error
    assert grew < RSS_LIMIT, result
    assert after <= AFTER_S, result
    assert latencies and not result["failed_probes"], result
    assert worst <= WORST_S, result


def _watching(addr: str) -> socket.socket | None:
    """A connection holding a running grpc.health.v1.Health/Watch call (the
    one call open without the auth token, and it never ends): None when the
    server refused the connection."""
    import hpack

    sock = _hello(addr)
    if sock is None:
        return None
    block = hpack.Encoder().encode(p.request_headers(path="/grpc.health.v1.Health/Watch"))
    sock.settimeout(5)
    try:
        request = p.frame(p.HEADERS, p.END_HEADERS, 1, block)
        sock.sendall(request + p.frame(p.DATA, p.END_STREAM, 1, p.message()))
        buf = b""
        while True:
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                kind, sid = buf[3], int.from_bytes(buf[5:9], "big")
                if kind == p.DATA and sid == 1:
                    return sock  # the first Watch reply: the call runs
                if kind == p.GOAWAY:
                    raise OSError("refused")
                buf = buf[9 + int.from_bytes(buf[:3], "big") :]
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("closed")
            buf += chunk
    except OSError:
        sock.close()
        return None


def test_a_watch_on_every_connection_does_not_lock_the_gateway_out(box) -> None:
    """What an attacker without the auth token can hold open forever is a
    grpc.health.v1.Health/Watch call. At the cap, a connection whose only
    running calls are watches counts as idle (backend/server.py IDLE_CALLS):
    twice the cap of Watch-holding connections later, a new client still gets
    in. (Measured before that rule: the cap's 512 Watch connections, ~140 bytes
    each, kept every new client out.) What still locks the gateway out: a
    running Backend call on every connection, i.e. the auth token (if set), a
    loaded model and `--max-concurrent-requests` at or above the cap.
    h2 only: C-core refuses new connections at its cap (idle_connection_slots)."""
    target_box = box[0]
    if target_box.transport != "h2":
        pytest.skip("C-core refuses new connections at its cap (idle_connection_slots)")
    worker = target_box.worker
    rss = RssSampler(worker.proc.pid)
    cpu = _cpu(worker.proc.pid)
    watchers: list[socket.socket] = []
    try:
        while len(watchers) < 2 * MAX_CONNECTIONS:
            sock = _watching(worker.addr)
            assert sock is not None, f"Watch connection {len(watchers) + 1} refused"
            watchers.append(sock)
        took = _new_client_health(worker.addr)
        evicted = sum(_closed_by_server(sock) for sock in watchers)
    finally:
        for sock in watchers:
            sock.close()
    grew = rss.stop()
    result = {
        "transport": "h2",
        "case": "a_watch_on_every_connection",
        "watch_connections": len(watchers),
        "evicted": evicted,
        "rss_mib": round(grew / MIB, 1),
        "worker_cpu_s": round(_cpu(worker.proc.pid) - cpu, 2),
        "new_client_health_ms": round(took * 1000, 1),
    }
    print(json.dumps(result))
    if os.environ.get("INBOUND_REPORT"):
        with open(os.environ["INBOUND_REPORT"], "a") as f:
            f.write(json.dumps(result) + "\n")
    assert len(watchers) - evicted <= MAX_CONNECTIONS, result  # the cap holds
    assert took < float("inf"), result
