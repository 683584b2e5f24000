"""Micro-benchmarks of the worker's per-token path, piece by piece (no engine).

    venv/bin/python -m bench.pieces [--n 20000] [--socket-writes 2000]

What one streamed token costs in the worker's own code, in µs per call (the
best of 5 timings of `n` calls, `time.perf_counter_ns`, uvloop as the worker
runs; on a shared machine the best is the figure least disturbed by others):

* `feed`: `OutputState.feed` of one token with no parser (a raw prompt or no
  tool/reasoning parser: the bench's B target);
* `chunk_logprobs`: `OutputState.chunk_logprobs` with logprobs off;
* `reply`: `replies.reply` of that piece (a `pb.Reply` with `message`);
* `serialize`: `Reply.SerializeToString` + the gRPC length prefix, as
  `h2grpc.calls.Context.write` does;
* `frame`: `h2grpc.frames.frame` of one DATA frame;
* `send_message`: `Sender.send_message` on a connection whose socket write is
  a no-op (window checks, flood credit, queue, `call_soon` of the flush);
* `write_path`: `Context.write` of a stream alone on its connection, with a
  no-op socket (`serialize` + `send_now`, written at once);
  `write_path_shared`: the same with another stream open, so the frame is
  queued and written by a flush in the next loop turn (minus a bare turn);
* `run_loop`: `generation.run` over a fake engine that yields `n` outputs of one
  token each, with `Context.write` as above, minus the same fake engine read by
  a bare `async for` (what vLLM's in-process driver does per token);
* `socket_write`: one ~20-byte `transport.write` on a loopback TCP connection to
  a reader process, 1 ms apart, CPU of this process (user + system, which on
  loopback includes the kernel's receive path and waking the reader) minus the
  same loop sleeping without writing; `socket_write_unix`: the same on a Unix
  socket (the worker listens on `unix:PATH` too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

from backend import generation, replies
from backend.h2grpc.calls import Context
from backend.h2grpc.flood import Flood
from backend.h2grpc.frames import DATA, GRPC_PREFIX, frame
from backend.h2grpc.outflow import Sender
from backend.h2grpc.stream import Stream
from backend.output.state import OutputState
from bench.common import run_async

TOKEN_TEXT = " Paris"


def best_us(fn: Callable[[], Any], n: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best / 1000.0


async def best_us_async(make: Callable[[], Any], n: int, rounds: int = 5) -> float:
    """`make()` returns a coroutine doing `n` operations."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        await make()
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best / 1000.0


class _Transport:
    """A socket that accepts every write and sends nothing."""

    def write(self, data: bytes) -> None:
        pass


class _Conn:
    """What `Context.write` uses of a connection: its sender, and how many
    streams are open (one: a message is written at once; more: in the next
    loop turn, with the others')."""

    def __init__(self, open_streams: int = 1) -> None:
        self.streams = SimpleNamespace(open=dict.fromkeys(range(open_streams)))
        self.sender = Sender(Flood(), lambda stream: None)
        self.sender.attach(_Transport())  # type: ignore[arg-type]
        self.sender.window = 2**62  # never blocks: flow control is not what is timed


class _Call:
    """What `Context` uses of a call."""

    def __init__(self, conn: _Conn, stream: Stream) -> None:
        self.conn = conn
        self.stream = stream


def _stream() -> Stream:
    stream = Stream(1, [], 65_535)
    stream.start_reply()
    stream.credit(2**31 - 1)
    return stream


def _output(i: int, finished: bool = False) -> Any:
    completion = SimpleNamespace(
        text=TOKEN_TEXT, token_ids=[1000 + i % 7], logprobs=None, finish_reason=None
    )
    if finished:
        completion.finish_reason = "length"
    return SimpleNamespace(
        outputs=[completion], prompt_token_ids=[1] * 40, finished=finished, metrics=None
    )


class _Engine:
    """`generate` yields `n` one-token outputs, the last finished, each after a loop turn."""

    closing = ""

    def __init__(self, n: int) -> None:
        self.n = n

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        for i in range(self.n):
            await asyncio.sleep(0)  # vLLM's queue: the consumer wakes once per output
            yield _output(i, finished=i == self.n - 1)

    def ensure_complete(self, out: Any) -> Any:
        return out


async def measure(n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    state = OutputState(None, None)
    out["feed"] = best_us(lambda: state.feed(TOKEN_TEXT, [1234], None), n)
    out["chunk_logprobs"] = best_us(state.chunk_logprobs, n)
    piece = state.feed(TOKEN_TEXT, [1234], None)
    out["reply"] = best_us(lambda: replies.reply(piece, chat=False, logprobs=b""), n)
    message = replies.reply(piece, chat=False)

    def serialize() -> bytes:
        data = message.SerializeToString()
        return GRPC_PREFIX.pack(0, len(data)) + data

    out["serialize"] = best_us(serialize, n)
    payload = serialize()
    out["frame"] = best_us(lambda: frame(DATA, 0, 1, payload), n)

    conn = _Conn()
    stream = _stream()
    sender = conn.sender

    async def sends() -> None:
        for _ in range(n):
            await sender.send_message(stream, payload)
            sender.flush()

    out["send_message"] = await best_us_async(sends, n)

    context = Context(_Call(conn, stream))  # type: ignore[arg-type]

    async def writes() -> None:
        for _ in range(n):
            await context.write(message)
            await asyncio.sleep(0)  # the flush runs in the next loop turn

    async def turns() -> None:
        for _ in range(n):
            await asyncio.sleep(0)

    turn = await best_us_async(turns, n)
    out["write_path"] = await best_us_async(writes, n) - turn
    shared = Context(_Call(_Conn(open_streams=2), stream))  # type: ignore[arg-type]

    async def shared_writes() -> None:
        for _ in range(n):
            await shared.write(message)
            await asyncio.sleep(0)

    out["write_path_shared"] = await best_us_async(shared_writes, n) - turn

    async def bare() -> None:
        async for _ in _Engine(n).generate():
            pass

    async def run_loop() -> None:
        gen = generation.Generation(None, None, OutputState(None, None), False, {})
        await generation.run(
            _Engine(n),  # type: ignore[arg-type]
            gen,
            "bench",
            context.write,
            count=lambda p, c: None,
        )

    out["run_loop_minus_bare_loop"] = await best_us_async(run_loop, n) - await best_us_async(
        bare, n
    )
    return out


def _reader(sock: socket.socket) -> None:
    while sock.recv(1 << 16):
        pass


async def socket_write(writes: int, gap_s: float, unix: bool = False) -> float:
    """CPU µs per small write on loopback TCP (or a Unix socket) to a reader
    process, minus the same loop sleeping without writing."""
    if unix:
        conn, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        peer = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        listener.close()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = mp.get_context("spawn").Process(target=_reader, args=(peer,), daemon=True)
    reader.start()
    peer.close()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, conn)
    data = frame(DATA, 0, 1, b"\x00\x00\x00\x00\x08" + b"\x0a\x06 Paris")

    async def paced(send: bool) -> float:
        cpu = time.process_time()
        for _ in range(writes):
            await asyncio.sleep(gap_s)
            if send:
                transport.write(data)
        return time.process_time() - cpu

    costs = []
    for _ in range(3):
        busy, idle = await paced(True), await paced(False)
        costs.append((busy - idle) / writes * 1e6)
    transport.close()
    reader.join(5)
    return sorted(costs)[1]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.pieces", description=__doc__)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--socket-writes", type=int, default=2000)
    args = p.parse_args()

    async def all_of() -> dict[str, float]:
        out = await measure(args.n)
        if args.socket_writes:
            out["socket_write"] = await socket_write(args.socket_writes, 0.001)
            out["socket_write_unix"] = await socket_write(args.socket_writes, 0.001, unix=True)
        return out

    result = run_async(all_of())
    for key, value in result.items():
        print(f"{key:28} {value:7.2f} µs")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
