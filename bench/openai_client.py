"""Target C's client: streams /v1/completions from vLLM's own OpenAI server.

`python -m bench.openai_client --fd N --url http://HOST:PORT --model NAME`.
Same requests as the gRPC client sends (raw prompt, greedy, ignore_eos,
max_tokens), SSE read with httpx in its own process.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import httpx

from bench.common import (
    Record,
    Workload,
    child_fd_arg,
    prompt_text,
    run_async,
    run_closed_loop,
    serve_commands,
)


async def amain(fd: int, url: str, model: str) -> None:
    client = httpx.AsyncClient(
        base_url=url,
        timeout=httpx.Timeout(600.0),
        limits=httpx.Limits(max_connections=128, max_keepalive_connections=128),
    )

    async def run(cmd: dict[str, Any]) -> dict[str, Any]:
        workload = Workload.from_json(cmd["workload"])
        if workload.kind != "raw":
            raise ValueError("the OpenAI client runs raw-prompt workloads only")

        async def one(i: int, rec: Record) -> None:
            body = {
                "model": model,
                "prompt": prompt_text(i),
                "max_tokens": workload.tokens,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            rec.sent = time.perf_counter()
            stamps = rec.stamps
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    now = time.perf_counter()
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    rec.messages += 1
                    chunk = json.loads(data)
                    choices = chunk.get("choices") or ()
                    if choices and choices[0].get("text"):
                        stamps.append(now)
                    usage = chunk.get("usage")
                    if usage:
                        rec.tokens = int(usage.get("completion_tokens") or 0)

        return await run_closed_loop(workload, one)

    try:
        await serve_commands(fd, {"run": run})
    finally:
        await client.aclose()


def main() -> None:
    argv = sys.argv
    run_async(
        amain(child_fd_arg(argv), argv[argv.index("--url") + 1], argv[argv.index("--model") + 1])
    )


if __name__ == "__main__":
    main()
