"""What the orchestrator and the driver/client processes share.

* `Workload`: one measured load shape (closed loop: `concurrency` users, each
  sending its next request as soon as the previous one ended, `requests` in all).
* The control channel: JSON lines over one end of a `socket.socketpair()`
  handed to the child by fd (stdout stays free for vLLM's logging).
* `run_closed_loop`: the per-request timing every driver/client uses, so A, B
  and C are timed by the same code: TTFT = send → first chunk carrying output,
  gaps = between successive chunks carrying output (what a streaming user sees).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KV_CACHE_BYTES = 256 * 2**20

# The tiny model's load, as tests/conftest.py `tiny_load_options` does it. The
# structured-outputs setting lets a grammar force the reasoning block too (chat
# workload); it is given to every target so all engines get the same arguments.
STRUCTURED_IN_REASONING = '--structured-outputs-config:{"enable_in_reasoning": true}'
NO_PARSERS = ("tool_parser:none", "reasoning_parser:none")
PARSERS = ("tool_parser:hermes", "reasoning_parser:qwen3")


# Extra engine options (`KEY:VALUE`, as in ModelOptions.Options) given to every
# target: `python -m bench --engine-option stream_interval:4`.
EXTRA_OPTIONS: list[str] = []


def model_options(model_dir: str, max_model_len: int, parsers: bool = False) -> dict[str, Any]:
    """ModelOptions fields (as a dict) for the worker's LoadModel and the A driver."""
    return {
        "Model": str(model_dir),
        "DType": "float32",
        "MaxModelLen": max_model_len,
        "EnforceEager": True,
        "Options": [
            f"--kv-cache-memory-bytes:{KV_CACHE_BYTES}",
            STRUCTURED_IN_REASONING,
            *(PARSERS if parsers else NO_PARSERS),
            *EXTRA_OPTIONS,
        ],
    }


def prompt_text(i: int) -> str:
    """A distinct ~40-token raw prompt per request (no prefix-cache shortcuts across them)."""
    return (
        f"Request {i}. Summarise the following notes about the weather in Paris, "
        "the trains to Lyon and the opening hours of the museum, in plain words."
    )


# ---- the chat workload: a forced reasoning block, then a tool call ----------------
# (~260 generated tokens: under grammar forcing the tiny model picks short tokens,
# ~1.7 per token of the text's own tokenization)

CHAT_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather report for a city, with what the user wants to know",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "details": {"type": "string"},
            },
            "required": ["city"],
        },
    },
}
CHAT_QUESTION = "What is the weather like in Paris today, and should I take an umbrella?"
_REASONING = (
    "The user asks about the weather in Paris today and whether to take an umbrella. "
    "I do not know the current weather, so I should not guess. The get_weather tool "
    "returns a report for a city: I will call it for Paris and ask about rain. "
    "After the tool answers, I will tell the user whether an umbrella is needed."
)
_DETAILS = "rain chance by hour for today, and the wind in the afternoon"
CHAT_FORCED = (
    f"<think>\n{_REASONING}\n</think>\n\n<tool_call>\n"
    + json.dumps({"name": "get_weather", "arguments": {"city": "Paris", "details": _DETAILS}})
    + "\n</tool_call>"
)
CHAT_MAX_TOKENS = 1024  # a cap only: the grammar ends the answer


# ---- workloads ---------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    concurrency: int
    requests: int
    tokens: int  # max new tokens (raw workloads: exactly this many, IgnoreEOS)
    kind: str = "raw"  # "raw" (Prompt) | "chat" (Messages + Tools + forced output)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Workload:
        return cls(**data)


def workloads(quick: bool) -> list[Workload]:
    if quick:
        return [
            Workload("c1", 1, 3, 64),
            Workload("c1short", 1, 16, 2),
            Workload("c8", 8, 8, 64),
            Workload("c32", 32, 32, 64),
            Workload("long", 1, 1, 400),
            Workload("chat8", 8, 8, CHAT_MAX_TOKENS, kind="chat"),
        ]
    return [
        Workload("c1", 1, 4, 256),
        Workload("c1short", 1, 32, 2),
        Workload("c8", 8, 16, 256),
        Workload("c32", 32, 64, 256),
        Workload("long", 1, 2, 1000),
        Workload("chat8", 8, 16, CHAT_MAX_TOKENS, kind="chat"),
    ]


# ---- timing --------------------------------------------------------------------------


@dataclass
class Record:
    """One request as its client saw it (times from time.perf_counter())."""

    sent: float = 0.0
    stamps: list[float] = field(default_factory=list)  # arrival of each chunk with output
    tokens: int = 0  # completion tokens
    messages: int = 0  # all messages/chunks received
    error: str = ""
    server_ttft_ms: float | None = None  # the worker's own timing_prompt_processing (B)

    def summary(self, origin: float) -> dict[str, Any]:
        s = self.stamps
        return {
            "start_s": round(self.sent - origin, 6),
            "end_s": round((s[-1] if s else self.sent) - origin, 6),
            "ttft_ms": round((s[0] - self.sent) * 1000.0, 4) if s else None,
            "gaps_ms": [round((b - a) * 1000.0, 4) for a, b in itertools.pairwise(s)],
            "tokens": self.tokens,
            "chunks": len(s),
            "messages": self.messages,
            "error": self.error,
            "server_ttft_ms": self.server_ttft_ms,
        }


async def run_closed_loop(
    workload: Workload, one: Callable[[int, Record], Awaitable[None]]
) -> dict[str, Any]:
    """`workload.concurrency` users, each sending its next request when the last ends.

    `one(i, record)` performs request i and fills the record (sent, stamps,
    tokens, messages). Returns per-request summaries, the wall time from the
    first send to the last answer, and this process's CPU seconds over it.
    """
    indices = iter(range(workload.requests))
    records: list[Record] = []

    async def user() -> None:
        for i in indices:  # shared iterator: each index taken once
            rec = Record()
            records.append(rec)
            try:
                await one(i, rec)
            except Exception as e:  # recorded, the run goes on
                rec.error = f"{type(e).__name__}: {e}"[:500]

    cpu0 = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(workload.concurrency)))
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    return {
        "wall_s": wall,
        "self_cpu_s": cpu,
        "requests": [r.summary(start) for r in records],
    }


# ---- control channel -------------------------------------------------------------------


class Channel:
    """Blocking JSON-lines channel (orchestrator side)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._r = sock.makefile("rb")

    def send(self, obj: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        line = self._r.readline()
        if not line:
            raise EOFError("the child process closed its control channel")
        return dict(json.loads(line))

    def close(self) -> None:
        self._r.close()
        self.sock.close()


class AsyncChannel:
    """The child's side, on its asyncio loop (the loop keeps serving the engine)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def from_fd(cls, fd: int) -> AsyncChannel:
        sock = socket.socket(fileno=fd)
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**24)
        return cls(reader, writer)

    async def recv(self) -> dict[str, Any]:
        line = await self.reader.readline()
        if not line:
            raise EOFError("the orchestrator closed the control channel")
        return dict(json.loads(line))

    async def send(self, obj: dict[str, Any]) -> None:
        self.writer.write(json.dumps(obj).encode() + b"\n")
        await self.writer.drain()


async def serve_commands(
    fd: int, handlers: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]]
) -> None:
    """Child main loop: {"op": name, ...} → handler → reply; "run" is two-phase.

    `run` answers {"op": "done"} the moment the workload ends (the orchestrator
    reads the serving processes' CPU then) and keeps the bulky results until
    it asks with {"op": "results"}, so their encoding is outside the window.
    """
    chan = await AsyncChannel.from_fd(fd)
    pending: dict[str, Any] | None = None
    while True:
        try:
            cmd = await chan.recv()
        except EOFError:
            return
        op = cmd.get("op")
        try:
            if op == "ping":
                await chan.send({"op": "pong"})
                continue
            if op == "quit":
                await chan.send({"op": "bye"})
                return
            if op == "results":
                out, pending = pending or {}, None
                await chan.send(out)
                continue
            result = await handlers[str(op)](cmd)
            if op == "run":
                pending = result
                await chan.send({"op": "done"})
            else:
                await chan.send(result)
        except Exception as e:
            await chan.send({"op": "error", "error": f"{type(e).__name__}: {e}"})


def child_fd_arg(argv: list[str]) -> int:
    """`--fd N` from a child's argv (the inherited control socket)."""
    i = argv.index("--fd")
    return int(argv[i + 1])


def aio_channel(addr: str) -> Any:
    """The bench clients' grpc.aio channel: 64 MiB messages both ways."""
    import grpc

    return grpc.aio.insecure_channel(
        addr,
        options=[
            ("grpc.max_receive_message_length", 64 * 2**20),
            ("grpc.max_send_message_length", 64 * 2**20),
        ],
    )


def run_async(main: Awaitable[Any]) -> Any:
    """Run a bench process's main coroutine on the event loop every bench
    process shares: `BENCH_LOOP` (uvloop by default, as vLLM's own server and
    our worker use; `asyncio` for the stock loop), set by `python -m bench --loop`."""
    factory = None
    if os.environ.get("BENCH_LOOP", "uvloop") == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)  # type: ignore[arg-type]


def quiet_child_env() -> dict[str, str]:
    """Environment for the benchmark's own children: importable repo, no bytecode churn."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    return env
