"""Target B's client: a grpc.aio client in its own process, like the gateway's.

`python -m bench.grpc_client --fd N --addr HOST:PORT`. One channel for all
concurrent streams (the gateway multiplexes users over one connection).
Ops: `load` (LoadModel, timed here), `run` (a workload), `quit`.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from backend.gen import backend_pb2 as pb
from backend.gen import backend_pb2_grpc
from bench.common import (
    CHAT_FORCED,
    CHAT_QUESTION,
    CHAT_TOOL,
    Record,
    Workload,
    aio_channel,
    child_fd_arg,
    prompt_text,
    run_async,
    run_closed_loop,
    serve_commands,
)
from tools.forcing import TAGS, gbnf_literal


async def amain(fd: int, addr: str) -> None:
    channel = aio_channel(addr)
    stub = backend_pb2_grpc.BackendStub(channel)
    state: dict[str, Any] = {}

    async def load(cmd: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        result = await stub.LoadModel(pb.ModelOptions(**cmd["model_options"]), timeout=900)
        seconds = time.perf_counter() - started
        return {"op": "loaded", "ok": result.success, "message": result.message, "seconds": seconds}

    async def tag_bias() -> str:
        if "bias" not in state:
            ids = {}
            for tag in TAGS:
                tokens = (await stub.TokenizeString(pb.PredictOptions(Prompt=tag))).tokens
                if len(tokens) != 1:
                    raise ValueError(f"{tag} is not one token in this model's tokenizer")
                ids[str(tokens[0])] = 100
            state["bias"] = json.dumps(ids)
        return str(state["bias"])

    def raw_request(i: int, workload: Workload) -> pb.PredictOptions:
        return pb.PredictOptions(
            Prompt=prompt_text(i), Tokens=workload.tokens, Temperature=0.0, IgnoreEOS=True
        )

    async def chat_request(i: int, workload: Workload) -> pb.PredictOptions:
        return pb.PredictOptions(
            UseTokenizerTemplate=True,
            Messages=[pb.Message(role="user", content=f"({i}) {CHAT_QUESTION}")],
            Tools=json.dumps([CHAT_TOOL]),
            Tokens=workload.tokens,
            Temperature=0.0,
            Grammar=gbnf_literal(CHAT_FORCED),
            LogitBias=await tag_bias(),
        )

    async def run(cmd: dict[str, Any]) -> dict[str, Any]:
        workload = Workload.from_json(cmd["workload"])
        if workload.kind == "chat":
            await tag_bias()  # looked up before the clock starts

        async def one(i: int, rec: Record) -> None:
            if workload.kind == "chat":
                request = await chat_request(i, workload)
            else:
                request = raw_request(i, workload)
            rec.sent = time.perf_counter()
            stamps = rec.stamps
            async for reply in stub.PredictStream(request, timeout=600):
                now = time.perf_counter()
                rec.messages += 1
                if reply.message or reply.chat_deltas:
                    stamps.append(now)
                if reply.tokens:
                    rec.tokens = reply.tokens
                    rec.server_ttft_ms = reply.timing_prompt_processing

        return await run_closed_loop(workload, one)

    try:
        await serve_commands(fd, {"load": load, "run": run})
    finally:
        await channel.close()


def main() -> None:
    argv = sys.argv
    run_async(amain(child_fd_arg(argv), argv[argv.index("--addr") + 1]))


if __name__ == "__main__":
    main()
