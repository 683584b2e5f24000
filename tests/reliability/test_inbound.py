"""Inbound attacks on the HTTP/2 transport, run against both transports.

One case per attack class of issue 11, each against a real worker process (no
model: the transport is what is attacked; Health is the probe). Every attack
is bounded in time (ATTACK_S) and bytes, on loopback. Each case asserts

- the connection-level reaction the transport must show (GOAWAY with a code,
  RST_STREAM, an error status, closing, or withholding flow-control window);
- the worker is alive and its RSS grew by less than 256 MiB (sampled every
  20 ms during the attack and just after);
- Health from a second, well-behaved grpc client (its own process, so the
  attacker's Python does not delay it) is answered during the attack, and OK
  within 2 s after it.

The latency goal during an attack is 100 ms. This machine has 2 cores and the
attacker itself keeps one busy, so cases that make the worker burn its core on
every frame (floods answered frame by frame) get a looser bound, LOOSE_S, with
the reason at the case. Every probe must be answered (none may time out).

Measurements go to $INBOUND_REPORT (JSON lines) when set.

Where the transports differ, each case accepts what a sound server may do and
names it: C-core refuses streams under rapid reset (REFUSED_STREAM) where
h2grpc sends GOAWAY(ENHANCE_YOUR_CALM), and absorbs SETTINGS, WINDOW_UPDATE
and PRIORITY floods cheaply (the flooding connection must then still serve a
call) where h2grpc counts them (backend/h2grpc/connection.py ABUSE_LIMIT). XFAIL lists,
with the measured symptom, the RFC 9113 rules C-core does not enforce.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil
import pytest

from tests.conftest import Worker
from tests.reliability import inbound_peer as p

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(120)]

MIB = 1 << 20
FLOOD_BYTES = 128 * MIB
ATTACK_S = 3.0
RSS_LIMIT = 256 * MIB
MAX_MESSAGE = 64 * MIB  # the worker's default --max-message-bytes
GOAL_S = 0.1  # Health latency during an attack: the median of the probes
# The worst single probe. This machine has 2 cores, shared with other test
# runs (load average ~20 while these were measured): single probes stall for
# up to ~1.3 s in cases whose median is 1-10 ms (grpcio rapid_reset 0.8 s,
# h2 hpack_bomb 1.3 s), on either transport; a probe that times out (3 s)
# fails the case.
WORST_S = 2.0
# Classes whose median cannot meet GOAL_S here, with the looser bound and why.
LOOSE_P50: dict[str, tuple[float, str]] = {
    "rapid_reset": (
        0.5,
        "every HEADERS+RST_STREAM pair is parsed and HPACK-decoded before it can be "
        "counted: C-core refuses the streams but its p50 measured 1.4-227 ms between "
        "runs (30000 pairs/s from the other core); h2grpc sends GOAWAY after 2000 "
        "resets, within one 256 KiB read (~4600 streams), p50 63-95 ms",
    ),
}
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
# and the two well-behaved clients, below what connection_flood opens.
MAX_CONNECTIONS = 512


def _start(transport: str) -> Box:
    # A 2 s handshake timeout (default 10 s), so idle_connections can see it act.
    env = {
        "BACKEND_TRANSPORT": transport,
        "BACKEND_HANDSHAKE_TIMEOUT_S": "2",
        "BACKEND_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    }
    worker = Worker(env=env)
    return Box(transport, worker, Prober(worker.addr))


@pytest.fixture(scope="module", params=TRANSPORTS)
def box(request) -> Iterator[Box]:
    current = _start(request.param)
    holder = [current]
    yield holder  # type: ignore[misc]
    holder[0].prober.close()
    holder[0].worker.stop()


# ---- attacks ---------------------------------------------------------------------
# Each takes the worker's address and a deadline, attacks until then, asserts the
# reaction and returns it in words.


def _reacted_on(peer: p.Peer, sid: int) -> bool:
    return bool(peer.goaway or peer.eof or peer.resets.get(sid) or peer.status.get(sid, 0) != 0)


def flow_control_overrun(addr: str, deadline: float) -> str:
    """A message declared within the limit, then DATA far beyond the granted
    windows on its stream."""
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
    """A message that declares 10 bytes, then DATA within the windows, on and on."""
    peer = p.Peer(addr)
    peer.send(peer.headers(1))
    let_in = peer.send_data(1, 256 * MIB, deadline, first=p.message(declared=10))
    reaction = peer.reaction() + f" accepted {let_in / MIB:.1f} MiB"
    # The stream must be refused, or the server must stop granting window once
    # it holds at most a message's worth.
    assert _reacted_on(peer, 1) or let_in <= MAX_MESSAGE + 16 * MIB, reaction
    peer.close()
    return reaction


def data_after_end_stream(addr: str, deadline: float) -> str:
    """A complete request, then DATA on the same stream (connection window only)."""
    peer = p.Peer(addr)
    peer.send(peer.headers(1) + p.frame(p.DATA, p.END_STREAM, 1, p.message()))
    let_in = peer.send_data(1, 256 * MIB, deadline, stream_window=False)
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
        if time.monotonic() >= deadline or not peer.send(peer.headers(sid), deadline):
            break
        let_in += peer.send_data(
            sid, MIB + 5, min(deadline, time.monotonic() + 0.05), first=p.message(declared=MIB)
        )

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
    """HEADERS then RST_STREAM(CANCEL), as fast as possible (CVE-2023-44487)."""
    peer = p.Peer(addr)
    sid = 1
    while time.monotonic() < deadline and not (peer.goaway or peer.eof):
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
    # refusing new streams while too many resets are pending.
    assert _calm(peer) or refused >= opened // 2, reaction
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
        # At most 128 MiB of frames: C-core absorbs some floods, and its RSS
        # grew with the volume (+152 MiB after 442 MB of WINDOW_UPDATE frames,
        # 34 million in 3 s; +21-38 MiB after 11 million).
        while (
            time.monotonic() < deadline
            and not (peer.goaway or peer.eof)
            and frames * len(batch) // 2000 < FLOOD_BYTES
        ):
            if not peer.send(batch, deadline):
                break
            frames += 2000
        # The server's answer to the flood (millions of ACKs for some kinds)
        # comes before any GOAWAY: wait while it talks, not for a fixed time.
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


def never_reads(addr: str, deadline: float) -> str:
    """10000 requests (paced over ~2 s) whose replies can be ~700 times their size (a 3.8 KiB path,
    HPACK-indexed once, then named in 1 byte; unknown methods are answered at
    once, the path echoed in grpc-message by some servers), never reading a
    byte of the replies. (No PINGs: both transports answer a PING flood with
    GOAWAY, see flood_ping.)"""
    peer = p.Peer(addr, read=False)
    path = "/backend.Backend/" + "x" * 3800  # fits the 4096-byte HPACK table
    first = peer.encoder.encode(p.request_headers(path=path))  # indexes every field
    again = peer.encoder.encode(p.request_headers(path=path))  # all indexed now
    peer.send(p.frame(p.HEADERS, p.END_HEADERS | p.END_STREAM, 1, first))
    sid, sent = 3, 1
    while sent < 10_000 and time.monotonic() < deadline:
        batch = b"".join(
            p.frame(p.HEADERS, p.END_HEADERS | p.END_STREAM, sid + 2 * i, again) for i in range(500)
        )
        if not peer.send(batch, deadline):
            break
        sid += 1000
        sent += 500
        time.sleep(0.1)  # paced: this case is about not reading, not a request flood
    reaction = f"{'closed' if peer.eof else 'open'}; {sent} requests never read"
    # What must hold is memory (asserted by the caller): the replies the
    # server keeps for a peer that does not read stay bounded.
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
    quiet, held for the attack's duration."""
    half = [p.Peer(addr, preface=False) for _ in range(200)]
    for peer in half:
        peer.send(p.PREFACE[:10])
    quiet = [p.Peer(addr) for _ in range(200)]
    time.sleep(max(0.0, deadline - time.monotonic()))
    for peer in half:  # the 2 s timeout plus scheduling slack
        peer.wait(lambda peer=peer: peer.eof, max(0.0, deadline + 1.5 - time.monotonic()))
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


def connection_flood(addr: str, deadline: float) -> str:
    """Twice the connection cap, each sending a valid preface, all held open until
    the deadline: those beyond the cap must be closed at once (the well-behaved
    clients, connected before, keep being served: the prober checks it)."""
    host, port = addr.rsplit(":", 1)
    hello = p.PREFACE + p.frame(p.SETTINGS, 0, 0)
    socks: list[socket.socket] = []
    try:
        while len(socks) < 2 * MAX_CONNECTIONS and time.monotonic() < deadline:
            try:
                sock = socket.create_connection((host, int(port)), timeout=2)
            except OSError:
                break  # not even accepted by the kernel: counted as closed below
            socks.append(sock)
            with contextlib.suppress(OSError):  # already closed: seen below
                sock.sendall(hello)
        time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
        closed = 0
        for sock in socks:
            sock.setblocking(False)
            try:
                while sock.recv(65536):  # our SETTINGS (and GOAWAY) first
                    pass
                closed += 1  # end of stream: the server closed it
            except BlockingIOError:
                pass  # open: nothing more to read
            except OSError:
                closed += 1  # reset by the server
        time.sleep(max(0.0, deadline - time.monotonic()))
    finally:
        for sock in socks:
            sock.close()
    opened = 2 * MAX_CONNECTIONS
    kept = len(socks) - closed
    reaction = f"{closed} of {len(socks)} closed at once, {kept} kept (cap {MAX_CONNECTIONS})"
    assert kept <= MAX_CONNECTIONS and closed + (opened - len(socks)) >= opened - MAX_CONNECTIONS, (
        reaction
    )
    return reaction


def hpack_bomb(addr: str, deadline: float) -> str:
    """A 4 KiB header inserted once, then referenced 16000 times (64 MiB of
    decoded headers from a 16 KiB block), on new connections until the deadline."""
    value = b"v" * 4000
    # literal with incremental indexing, new name; value length 4000 = 127 + 3873
    # (HPACK integer: 0x7f, then 3873 in 7-bit groups, low first: 0xa1 0x1e)
    literal = b"\x40\x06x-bomb\x7f\xa1\x1e" + value
    reactions = set()
    n = 0
    while time.monotonic() < deadline:
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
        n += 1
    return " | ".join(sorted(reactions)) + f" on {n} connections"


@dataclass(frozen=True)
class Case:
    name: str
    attack: Callable[[str, float], str]


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
    Case("idle_stream_frame", idle_stream_frame),
    Case("stream_id_regression", stream_id_regression),
    Case("window_overflow", window_overflow),
    Case("bad_pseudo_headers", bad_pseudo_headers),
    Case("bad_te", bad_te),
    Case("bad_content_type", bad_content_type),
    Case("empty_padded_headers", empty_padded_headers),
    Case("idle_connections", idle_connections),
    Case("hpack_bomb", hpack_bomb),
    Case("connection_flood", connection_flood),
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
    worker = target_box.worker
    rss = RssSampler(worker.proc.pid)
    target_box.prober.start()
    error: BaseException | None = None
    reaction = "?"
    try:
        reaction = case.attack(worker.addr, time.monotonic() + ATTACK_S)
    except AssertionError as exc:  # the reaction was wrong: still measure the rest
        error = exc
        reaction = f"WRONG: {exc}"
    finally:  # whatever the attack raised, the prober must not stay started
        latencies = target_box.prober.stop()
    after = _health_after(worker) if worker.proc.poll() is None else float("inf")
    time.sleep(0.2)
    grew = rss.stop()
    answered = [x for x in latencies if x is not None]
    p50 = statistics.median(answered) if answered else float("inf")
    worst = max(answered) if answered else float("inf")
    result = {
        "transport": transport,
        "case": case.name,
        "reaction": reaction,
        "rss_mib": round(grew / MIB, 1),
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
    assert p50 <= LOOSE_P50.get(case.name, (GOAL_S, ""))[0], result
    assert worst <= WORST_S, result
