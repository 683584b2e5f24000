"""A blocking gRPC-over-HTTP/2 client on hyper-h2 (python-hyper), for tests.

hyper-h2 is a strict HTTP/2 state machine: it raises on any protocol violation
by the server (DATA beyond the window it granted, frames larger than its
SETTINGS_MAX_FRAME_SIZE, frames on a closed stream, malformed response
headers). Unlike grpc's client it also lets a test decide exactly when the
flow-control window opens, i.e. play a consumer that stops reading.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h2.config as h2_config
import h2.connection as h2_connection
import h2.events as h2_events
import h2.settings as h2_settings

SERVICE = "/backend.Backend/"


@dataclass
class Stream:
    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None
    largest_frame: int = 0
    unacked: int = 0  # received while auto_ack was off

    def messages(self) -> list[bytes]:
        """The gRPC length-prefixed messages in the body (uncompressed)."""
        out, at = [], 0
        while at < len(self.body):
            flag, size = struct.unpack(">BI", bytes(self.body[at : at + 5]))
            assert flag == 0, "replies are never compressed"
            out.append(bytes(self.body[at + 5 : at + 5 + size]))
            at += 5 + size
        assert at == len(self.body), "the body ends inside a message"
        return out

    def status(self) -> tuple[int, str]:
        """(grpc-status, grpc-message): from trailers, or a trailers-only response."""
        where = self.trailers or self.headers
        return int(where["grpc-status"]), where.get("grpc-message", "")


class H2Client:
    """A blocking HTTP/2 client on hyper-h2; every received byte goes through
    its validating state machine."""

    def __init__(self, addr: str, **settings: int) -> None:
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.conn = h2_connection.H2Connection(
            h2_config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.conn.local_settings = h2_settings.Settings(
            client=True,
            initial_values={getattr(h2_settings.SettingCodes, k): v for k, v in settings.items()},
        )
        self.conn.initiate_connection()
        self.streams: dict[int, Stream] = {}
        self.pings_acked = 0
        self.terminated: Any = None
        self.auto_ack = True
        self.flush()

    def close(self) -> None:
        self.sock.close()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def call(self, method: str, request: Any, *extra: tuple[str, str], send: bool = True) -> int:
        """Open a stream with one request message. With send=False the frames
        wait in the connection until flush(): calls made that way leave in one
        write, so the server receives them together whatever this process's
        scheduling (a test's precondition must not depend on machine load)."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", SERVICE + method),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *extra,
            ],
        )
        payload = request.SerializeToString()
        self.conn.send_data(sid, struct.pack(">BI", 0, len(payload)) + payload, end_stream=True)
        self.streams[sid] = Stream()
        if send:
            self.flush()
        return sid

    def _handle(self, event: Any) -> None:
        if isinstance(event, h2_events.ResponseReceived):
            self.streams[event.stream_id].headers = dict(event.headers)
        elif isinstance(event, h2_events.TrailersReceived):
            self.streams[event.stream_id].trailers = dict(event.headers)
        elif isinstance(event, h2_events.DataReceived):
            stream = self.streams[event.stream_id]
            stream.body += event.data
            stream.largest_frame = max(stream.largest_frame, event.flow_controlled_length)
            if self.auto_ack:
                self.ack(event.stream_id, event.flow_controlled_length)
            else:
                stream.unacked += event.flow_controlled_length
        elif isinstance(event, h2_events.StreamEnded):
            self.streams[event.stream_id].ended = True
        elif isinstance(event, h2_events.StreamReset):
            self.streams[event.stream_id].reset = event.error_code
        elif isinstance(event, h2_events.PingAckReceived):
            self.pings_acked += 1
        elif isinstance(event, h2_events.ConnectionTerminated):
            self.terminated = event

    def ack(self, stream_id: int, size: int) -> None:
        if size:
            self.conn.acknowledge_received_data(size, stream_id)

    def read_on(self, *stream_ids: int) -> None:
        """Start acknowledging again: give back what these streams received
        while auto_ack was off, and everything that arrives from now on."""
        self.auto_ack = True
        for sid in stream_ids:
            stream = self.streams[sid]
            self.ack(sid, stream.unacked)
            stream.unacked = 0
        self.flush()

    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Read and validate frames until `until()` holds; False on timeout."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(min(left, 0.2))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return until()
            for event in self.conn.receive_data(data):
                self._handle(event)
            self.flush()
        return True

    def idle(self, seconds: float) -> None:
        """Keep reading (and validating) for a while without a goal."""
        self.pump(lambda: False, timeout=seconds)
