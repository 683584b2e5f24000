"""A raw HTTP/2 peer for tests/reliability/test_inbound.py: it sends whatever
frames a test builds (valid or not) and records, in a reader thread, what the
server answers at the connection level (GOAWAY, RST_STREAM, status, closing).

Frames are built by hand (hyper-h2 refuses to send most of what these tests
must send); header blocks are HPACK-encoded with `hpack`, the server's header
blocks decoded with it. Outbound flow control is tracked from the server's
SETTINGS and WINDOW_UPDATE frames so a test can respect the windows it was
granted, or deliberately not.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections import defaultdict

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0,
    1,
    2,
    3,
    4,
    6,
    7,
    8,
    9,
)
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
ERRORS = {
    0: "NO_ERROR",
    1: "PROTOCOL_ERROR",
    2: "INTERNAL_ERROR",
    3: "FLOW_CONTROL_ERROR",
    4: "SETTINGS_TIMEOUT",
    5: "STREAM_CLOSED",
    6: "FRAME_SIZE_ERROR",
    7: "REFUSED_STREAM",
    8: "CANCEL",
    9: "COMPRESSION_ERROR",
    10: "CONNECT_ERROR",
    11: "ENHANCE_YOUR_CALM",
    12: "INADEQUATE_SECURITY",
    13: "HTTP_1_1_REQUIRED",
}
PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, REFUSED_STREAM, ENHANCE_YOUR_CALM = (
    1,
    3,
    5,
    7,
    11,
)
HEALTH = "/backend.Backend/Health"


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", sid)
        + payload
    )


def message(payload: bytes = b"", declared: int | None = None) -> bytes:
    """A gRPC length-prefixed message (its prefix may lie about the size)."""
    return struct.pack(">BI", 0, len(payload) if declared is None else declared) + payload


def request_headers(
    path: str = HEALTH,
    drop: tuple[str, ...] = (),
    extra: tuple[tuple[str, str], ...] = (),
    replace: dict[str, str] | None = None,
) -> list[tuple[str, str]]:
    base = {
        ":method": "POST",
        ":scheme": "http",
        ":path": path,
        ":authority": "localhost",
        "content-type": "application/grpc",
        "te": "trailers",
    }
    base.update(replace or {})
    return [(k, v) for k, v in base.items() if k not in drop] + list(extra)


class Peer:
    """One raw HTTP/2 client connection."""

    def __init__(self, addr: str, read: bool = True, preface: bool = True) -> None:
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = 1 << 24
        self.lock = threading.Lock()  # socket writes
        self.cv = threading.Condition()  # window changes and events
        self.goaway: tuple[int, int] | None = None  # (error code, last stream id)
        self.resets: dict[int, int] = {}
        self.status: dict[int, int] = {}  # grpc-status (or HTTP :status when not 200)
        self.ended: set[int] = set()
        self.eof = False  # the server closed: everything it sent before is parsed
        self.write_failed = False  # a write failed (the server reset or closed)
        self.frames_in = 0
        self.settings_acks = 0
        self.conn_window = 65_535
        self.initial_window = 65_535
        self.stream_credit: dict[int, int] = defaultdict(int)  # WINDOW_UPDATEs per stream
        self.stream_sent: dict[int, int] = defaultdict(int)
        self.sent = 0  # bytes written into the socket
        self._block = bytearray()
        self._block_sid = 0
        self.closed = False
        self.preface = preface  # without it, a SETTINGS ACK would be garbage
        self.reads = read
        if preface:
            self.send(PREFACE + frame(SETTINGS, 0, 0))
        self.reader: threading.Thread | None = None
        if read:
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()

    # ---- sending ------------------------------------------------------------

    def send(self, data: bytes, deadline: float | None = None) -> bool:
        """Write `data` (until `deadline`); False if the connection is gone or
        the deadline passed before everything left."""
        view = memoryview(data)
        with self.lock:
            while view:
                if self.closed or self.eof or self.write_failed:
                    return False
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                self.sock.settimeout(0.2)
                try:
                    n = self.sock.send(view)
                except TimeoutError:
                    continue
                except OSError:
                    # The server reset the connection. What it sent before the
                    # reset (a GOAWAY saying why) may still wait in the socket
                    # or in the reader's hands: the reader says EOF once it has
                    # parsed it all. A write error is not the end of reading.
                    self.write_failed = True
                    if not self.reads:
                        with self.cv:
                            self.eof = True
                            self.cv.notify_all()
                    return False
                self.sent += n
                view = view[n:]
        return True

    def headers(self, sid: int, flags: int = END_HEADERS, **kw) -> bytes:
        return frame(HEADERS, flags, sid, self.encoder.encode(request_headers(**kw)))

    def window(self, sid: int) -> int:
        return min(
            self.conn_window, self.initial_window + self.stream_credit[sid] - self.stream_sent[sid]
        )

    def send_data(
        self,
        sid: int,
        total: int,
        deadline: float,
        stream_window: bool = True,
        first: bytes = b"",
        stall: float = 2.0,
    ) -> int:
        """Send `first` then zeros as DATA on `sid`, `total` bytes in all,
        within the windows granted (the stream's only if `stream_window`).
        Stops at a GOAWAY, closing, a reset of `sid`, when the server has
        granted no window for `stall` seconds (it withholds it), or at the
        deadline (a guard against a hang). Returns the bytes the server let in."""
        done = 0
        body = first
        while done < total and time.monotonic() < deadline:
            with self.cv:
                waited_since = time.monotonic()
                while True:
                    if self.goaway or self.eof or sid in self.resets:
                        return done
                    room = self.window(sid) if stream_window else self.conn_window
                    if room > 0:
                        break
                    left = min(deadline, waited_since + stall) - time.monotonic()
                    if left <= 0:
                        return done
                    self.cv.wait(min(left, 0.1))
                n = min(16_384, room, total - done)
                self.conn_window -= n
                self.stream_sent[sid] += n
            chunk = body[:n] + bytes(max(0, n - len(body[:n])))
            body = body[n:]
            if not self.send(frame(DATA, 0, sid, chunk), deadline):
                return done
            done += n
        return done

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    # ---- receiving ----------------------------------------------------------

    def _read(self) -> None:
        buf = bytearray()
        while not self.closed:
            try:
                self.sock.settimeout(0.2)
                data = self.sock.recv(1 << 18)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                with self.cv:
                    self.eof = True
                    self.cv.notify_all()
                return
            buf += data
            pos = 0
            # Every whole frame of this read under one lock: a flood's replies
            # (millions of ACKs) are parsed as fast as this thread can.
            with self.cv:
                while len(buf) - pos >= 9:
                    length = int.from_bytes(buf[pos : pos + 3], "big")
                    if len(buf) - pos < 9 + length:
                        break
                    kind, flags = buf[pos + 3], buf[pos + 4]
                    sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                    payload = bytes(buf[pos + 9 : pos + 9 + length])
                    pos += 9 + length
                    self._frame(kind, flags, sid, payload)
                self.cv.notify_all()
            del buf[:pos]

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        self.frames_in += 1
        if kind == SETTINGS and flags & ACK:
            self.settings_acks += 1
        elif kind == SETTINGS and not flags & ACK:
            for off in range(0, len(payload) - 5, 6):
                key, value = struct.unpack_from(">HI", payload, off)
                if key == 4:
                    self.initial_window = value
            if self.preface:
                self.send(frame(SETTINGS, ACK, 0))
        elif kind == WINDOW_UPDATE and len(payload) == 4:
            inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
            if sid == 0:
                self.conn_window += inc
            else:
                self.stream_credit[sid] += inc
        elif kind == GOAWAY:
            last, code = struct.unpack_from(">II", payload)
            self.goaway = (code, last & 0x7FFFFFFF)
        elif kind == RST_STREAM:
            self.resets[sid] = int.from_bytes(payload[:4], "big")
        elif kind in (HEADERS, CONTINUATION):
            if kind == HEADERS:
                start, end = 0, len(payload)
                if flags & PADDED:
                    start, end = 1, len(payload) - payload[0]
                if flags & 0x20:
                    start += 5
                self._block = bytearray(payload[start:end])
                self._block_sid = sid
                self._block_end = bool(flags & END_STREAM)
            else:
                self._block += payload
            if flags & END_HEADERS:
                try:
                    fields = dict(self.decoder.decode(bytes(self._block)))
                except Exception:
                    fields = {}
                if fields.get(":status", "200") != "200":
                    self.status[sid] = int(fields[":status"])
                elif "grpc-status" in fields:
                    self.status[sid] = int(fields["grpc-status"])
                if self._block_end:
                    self.ended.add(sid)
        elif kind == DATA and flags & END_STREAM:
            self.ended.add(sid)

    def wait(self, until, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cv:
            while not until():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cv.wait(min(left, 0.1))
        return True

    def wait_while_talking(self, until, silence: float, limit: float = 300) -> bool:
        """Wait for `until()` as long as the server keeps sending: give up only
        after `silence` seconds in which no frame arrived (or at EOF, or after
        `limit` seconds in all, against a server that never stops). After a
        flood the server may owe millions of ACKs, which arrive before
        anything it says next; how long reading them takes depends on the
        machine, whether the server still talks does not."""
        with self.cv:
            start = time.monotonic()
            seen, quiet_since = self.frames_in, start
            while not until():
                if self.eof:
                    return False
                now = time.monotonic()
                if self.frames_in != seen:
                    seen, quiet_since = self.frames_in, now
                elif now - quiet_since >= silence:
                    return False
                if now - start >= limit:
                    return False
                self.cv.wait(0.1)
        return True

    def reaction(self) -> str:
        """What the server did to this connection, in words (under the reader's
        lock: its dicts change while it reads)."""
        with self.cv:
            return self._reaction()

    def _reaction(self) -> str:
        out = []
        if self.goaway is not None:
            out.append(f"GOAWAY({ERRORS.get(self.goaway[0], self.goaway[0])})")
        codes = sorted({ERRORS.get(c, str(c)) for c in self.resets.values()})
        if codes:
            out.append(f"RST_STREAM({'/'.join(codes)})x{len(self.resets)}")
        bad = sorted({s for s in self.status.values() if s})
        if bad:
            out.append(f"status{bad}")
        if self.eof:
            out.append("closed")
        return " ".join(out) or "none"


def wait_all_while_talking(peers, until, silence: float, limit: float = 300) -> list[bool]:
    """`Peer.wait_while_talking` for many peers at once: each peer's wait is the
    same (until `until(peer)`, its EOF, `silence` seconds without a frame from
    it, or `limit`), but the waits run side by side, so 40 quiet peers cost one
    silence, not 40 in a row. Returns each peer's outcome, in order."""
    start = time.monotonic()
    marks = [(peer.frames_in, start) for peer in peers]
    done: list[bool | None] = [None] * len(peers)
    while None in done:
        now = time.monotonic()
        for i, peer in enumerate(peers):
            if done[i] is not None:
                continue
            with peer.cv:
                if until(peer):
                    done[i] = True
                    continue
                if peer.frames_in != marks[i][0]:  # it talked: its silence starts again
                    marks[i] = (peer.frames_in, now)
                if peer.eof or now - marks[i][1] >= silence or now - start >= limit:
                    done[i] = False
        if None in done:
            time.sleep(0.05)
    return [bool(d) for d in done]
