"""The transport floor: what the gRPC server itself costs here, with no engine behind it.

`python -m bench.floor [--cadence-ms 2.1] [--messages 1500] [--transport h2|grpcio|both]
[--concurrency 1,32,256]`
(the orchestrator runs it last for both transports, with the c1 inter-token gap
A measured, and stores the results under `floors` in the JSON).

A trivial servicer behind the worker's own server (`backend.server.make_server`:
the same transport, options and event loop) in one process, a grpc.aio client
like target B's in another, same session. Two numbers:

* `ttft_ms`: PredictStream sent → first message received, when the server
  writes at once (p50 of 300). This is the part of B's TTFT overhead no
  worker can remove: a TTFT-overhead goal below it cannot be met with a Python
  client on this machine.
* `server_cpu_us_per_msg`: CPU of the server process per streamed message when
  messages leave at the engine's c1 cadence, minus the same loop sleeping at
  that cadence without sending (so timer wake-ups are not counted).
  With --concurrency, also at c streams at once (`by_concurrency`: each of the
  c streams sends max(20, messages // c) messages at the cadence; the client is
  one Python process, so at c=256 it may not keep the cadence: the number is
  server CPU per message actually sent, whatever the rate), and
  `ttft_by_concurrency`: first-message latency when c streams are sent at once
  (5 rounds; includes this Python client's own cost of c concurrent calls).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import time
from typing import Any

import grpc

from backend.config import TRANSPORTS, parse_config
from backend.gen import backend_pb2 as pb
from backend.gen import backend_pb2_grpc
from backend.server import make_server
from bench.common import run_async
from bench.run import cpu_seconds


class _Streamer(backend_pb2_grpc.BackendServicer):
    """PredictStream: `Tokens` messages `TopP` ms apart (0 = one message at once);
    `TopK=1`: the same sleeps without sending (the timer baseline)."""

    async def PredictStream(
        self, request: pb.PredictOptions, context: grpc.aio.ServicerContext
    ) -> None:
        gap = request.TopP / 1000.0
        silent = request.TopK == 1
        for _ in range(max(1, request.Tokens)):
            if gap:
                await asyncio.sleep(gap)
            if not silent:
                await context.write(pb.Reply(message=b"tok"))
        if silent:
            await context.write(pb.Reply(message=b"end"))


def _serve(port_queue: Any, transport: str) -> None:
    async def main() -> None:
        config = parse_config(["--addr", "127.0.0.1:0", "--transport", transport], env={})
        server = make_server(config, _Streamer())
        port_queue.put(await server.listen())
        await asyncio.Event().wait()

    run_async(main())


async def _measure(
    port: int, server_pid: int, cadence_ms: float, messages: int, concurrency: tuple[int, ...] = ()
) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = backend_pb2_grpc.BackendStub(channel)
    firsts: list[float] = []
    for i in range(320):
        sent = time.perf_counter()
        first = None
        async for _ in stub.PredictStream(pb.PredictOptions(Tokens=1)):
            first = first or time.perf_counter() - sent
        if i >= 20:  # warm-up
            firsts.append((first or 0.0) * 1000.0)
        await asyncio.sleep(0.005)

    async def stream(silent: bool) -> float:
        before = cpu_seconds(server_pid, False)
        request = pb.PredictOptions(Tokens=messages, TopP=cadence_ms, TopK=1 if silent else 0)
        async for _ in stub.PredictStream(request):
            pass
        return cpu_seconds(server_pid, False) - before

    sending, sleeping = [], []
    for _ in range(3):
        sending.append(await stream(False))
        sleeping.append(await stream(True))
    per_msg = (statistics.median(sending) - statistics.median(sleeping)) / messages * 1e6

    async def streams(c: int, silent: bool) -> tuple[float, int]:
        each = max(20, messages // c)
        request = pb.PredictOptions(Tokens=each, TopP=cadence_ms, TopK=1 if silent else 0)

        async def one() -> None:
            async for _ in stub.PredictStream(request):
                pass

        before = cpu_seconds(server_pid, False)
        await asyncio.gather(*(one() for _ in range(c)))
        return cpu_seconds(server_pid, False) - before, each * c

    async def first(request: pb.PredictOptions) -> float:
        sent = time.perf_counter()
        async for _ in stub.PredictStream(request):
            return (time.perf_counter() - sent) * 1000.0
        return float("nan")

    ttft_by_c: dict[str, dict[str, float]] = {}
    for c in concurrency:  # c streams sent at once, the server writes at once
        firsts_c: list[float] = []
        for _ in range(5):
            firsts_c += await asyncio.gather(
                *(first(pb.PredictOptions(Tokens=1)) for _ in range(c))
            )
        firsts_c.sort()
        ttft_by_c[f"c{c}"] = {
            "p50_ms": statistics.median(firsts_c),
            "p95_ms": firsts_c[int(len(firsts_c) * 0.95)],
        }

    by_c: dict[str, float] = {}
    for c in concurrency:
        runs = [(await streams(c, False), await streams(c, True)) for _ in range(3)]
        busy = statistics.median(r[0][0] for r in runs)
        idle = statistics.median(r[1][0] for r in runs)
        by_c[f"c{c}"] = (busy - idle) / runs[0][0][1] * 1e6
    await channel.close()
    return {
        "server_cpu_us_per_msg_by_concurrency": by_c,
        "ttft_by_concurrency": ttft_by_c,
        "ttft_ms": statistics.median(firsts),
        "ttft_p95_ms": sorted(firsts)[int(len(firsts) * 0.95)],
        "cadence_ms": cadence_ms,
        "server_cpu_us_per_msg": per_msg,
        "server_cpu_us_per_msg_raw": statistics.median(sending) / messages * 1e6,
    }


def measure(
    cadence_ms: float = 2.0,
    messages: int = 1500,
    transport: str = "h2",
    concurrency: tuple[int, ...] = (),
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=_serve, args=(ports, transport), daemon=True)
    server.start()
    try:
        port = ports.get(timeout=60)
        assert server.pid is not None
        result: dict[str, Any] = run_async(
            _measure(port, server.pid, cadence_ms, messages, concurrency)
        )
        return result
    finally:
        server.kill()
        server.join(10)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    p.add_argument("--cadence-ms", type=float, default=2.0)
    p.add_argument("--messages", type=int, default=1500)
    p.add_argument("--transport", choices=(*TRANSPORTS, "both"), default="h2")
    p.add_argument("--concurrency", default="", help="e.g. 1,32,256: also measure at c streams")
    args = p.parse_args()
    concurrency = tuple(int(c) for c in args.concurrency.split(",") if c)
    transports = TRANSPORTS if args.transport == "both" else (args.transport,)
    results = {t: measure(args.cadence_ms, args.messages, t, concurrency) for t in transports}
    json.dump(results if len(results) > 1 else results[transports[0]], sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
