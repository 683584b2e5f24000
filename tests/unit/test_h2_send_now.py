"""`Sender.send_now`: a streamed message in one DATA frame without a coroutine,
only when nothing must wait; otherwise `send_message` (which waits) is used."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from backend.h2grpc.flood import Flood
from backend.h2grpc.frames import DATA, GRPC_PREFIX, MAX_FRAME, data_message, frame
from backend.h2grpc.outflow import Sender
from backend.h2grpc.stream import Stream


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def sender_and_stream(window: int = 65_535) -> tuple[Sender, Stream, Transport]:
    sender = Sender(Flood(), lambda stream: None)
    transport = Transport()
    sender.attach(transport)  # type: ignore[arg-type]
    sender.window = window
    stream = Stream(1, [], 65_535)
    return sender, stream, transport


def in_loop(test: Callable[[], None]) -> Callable[[], None]:
    """Run the test body inside an event loop (`Sender.write` schedules its flush)."""

    @functools.wraps(test)
    def run() -> None:
        async def body() -> Any:
            return test()

        asyncio.run(body())

    return run


def test_data_message_is_the_frame_of_the_prefixed_message():
    for size in (0, 1, 300, 70_000):
        message = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        expected = frame(DATA, 0, 7, GRPC_PREFIX.pack(0, len(message)) + message)
        assert data_message(7, message) == expected


@in_loop
def test_it_sends_when_nothing_waits():
    sender, stream, transport = sender_and_stream()
    stream.start_reply()
    assert sender.send_now(stream, b"hello")
    sender.flush()
    assert transport.written == [data_message(1, b"hello")]
    assert sender.window == 65_535 - 10
    assert stream.send_credit == -10
    assert sender.flood.credit > 0


@in_loop
def test_it_leaves_to_send_message_what_must_wait():
    sender, stream, _ = sender_and_stream()
    assert not sender.send_now(stream, b"x"), "the reply's headers are not out yet"
    stream.start_reply()
    stream.queue(b"waiting")
    assert not sender.send_now(stream, b"x"), "earlier data waits for window"

    sender, stream, _ = sender_and_stream(window=9)
    stream.start_reply()
    assert not sender.send_now(stream, b"12345"), "the connection window is too small"
    assert sender.window == 9 and stream.send_credit == 0, "nothing was spent"

    sender, stream, _ = sender_and_stream()
    stream.start_reply()
    assert not sender.send_now(stream, b"x" * MAX_FRAME), "larger than one frame"

    sender, stream, _ = sender_and_stream()
    stream.start_reply()
    sender.initial_window = 4
    assert not sender.send_now(stream, b"x"), "the stream window is too small"


@in_loop
def test_it_waits_while_the_socket_is_full():
    sender, stream, _ = sender_and_stream()
    stream.start_reply()
    sender.pause()
    assert not sender.send_now(stream, b"x")
    sender.resume()
    assert sender.send_now(stream, b"x")


@in_loop
def test_a_lone_streams_message_is_written_at_once():
    """No other stream is open: waiting for the loop's next turn would batch
    nothing and cost a turn per token."""
    sender, stream, transport = sender_and_stream()
    stream.start_reply()
    assert sender.send_now(stream, b"now", alone=True)
    assert transport.written == [data_message(1, b"now")]
    assert not sender.out and not sender.flush_scheduled


@in_loop
def test_a_lone_message_keeps_its_place_behind_frames_already_queued():
    sender, stream, transport = sender_and_stream()
    stream.start_reply()
    sender.write(b"queued-first")
    assert sender.send_now(stream, b"later", alone=True)
    assert transport.written == [], "it waits with what was queued before it"
    sender.flush()
    assert transport.written == [b"queued-first" + data_message(1, b"later")]


@in_loop
def test_messages_of_streams_sharing_a_connection_leave_in_one_write():
    sender, first, transport = sender_and_stream()
    second = Stream(3, [], 65_535)
    for stream in (first, second):
        stream.start_reply()
        assert sender.send_now(stream, b"token", alone=False)
    assert transport.written == []
    sender.flush()
    assert transport.written == [data_message(1, b"token") + data_message(3, b"token")]


@in_loop
def test_nothing_is_written_once_the_connection_closes():
    sender, stream, transport = sender_and_stream()
    stream.start_reply()
    sender.stop()
    sender.send_now(stream, b"late", alone=True)
    sender.flush()
    assert transport.written == []
