"""`make demo`: build the tiny local model, start the worker the way the gateway
does (`run.sh --addr`), load the model and stream a chat reply to the terminal.

The tiny model has random weights, so its free text is gibberish; the demo
forces a realistic answer (reasoning, then a tool call) with a grammar, which
exercises the whole path — chat template, engine, vLLM's reasoning and tool
parsers, streamed ChatDeltas. Point `DEMO_MODEL` at a real model directory or
hub id (on a machine that has one) to see its own answer, unforced.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from backend.gen import backend_pb2 as pb
from backend.gen import backend_pb2_grpc
from tools.forcing import WEATHER_TOOL, gbnf_literal, tag_bias

ROOT = Path(__file__).resolve().parents[1]
FORCED = (
    "<think>\nThe user wants the weather in Paris; I have a tool for that.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)
DIM, BOLD, CYAN, RESET = "\033[2m", "\033[1m", "\033[36m", "\033[0m"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    model = os.environ.get("DEMO_MODEL")
    if model is None:
        from tools.tiny_model import build_tiny_model, default_model_dir

        model = str(build_tiny_model(default_model_dir()))
        print(f"{DIM}tiny local model: {model}{RESET}")
    addr = f"127.0.0.1:{_free_port()}"
    log_path = ROOT / ".cache" / "demo-worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [str(ROOT / "run.sh"), "--addr", addr],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return _drive(addr, model, worker, log_path)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)


def _drive(addr: str, model: str, worker: subprocess.Popen, log_path: Path) -> int:
    stub = backend_pb2_grpc.BackendStub(grpc.insecure_channel(addr))
    print(f"{DIM}worker: run.sh --addr {addr} (log: {log_path}){RESET}")
    deadline = time.monotonic() + 60
    while True:
        try:
            stub.Health(pb.HealthMessage(), timeout=2)
            break
        except grpc.RpcError:
            if worker.poll() is not None or time.monotonic() > deadline:
                print("worker did not start; see the log", file=sys.stderr)
                return 1
            time.sleep(0.2)
    tiny = "DEMO_MODEL" not in os.environ
    options = ["tool_parser:hermes", "reasoning_parser:qwen3"]
    if tiny:
        options += [
            f"--kv-cache-memory-bytes:{256 * 2**20}",
            '--structured-outputs-config:{"enable_in_reasoning": true}',
        ]
    started = time.monotonic()
    result = stub.LoadModel(
        pb.ModelOptions(
            Model=model,
            DType="float32",
            MaxModelLen=2048,
            EnforceEager=True,
            Options=options,
        ),
        timeout=600,
    )
    if not result.success:
        print(f"LoadModel failed: {result.message}", file=sys.stderr)
        return 1
    print(f"{DIM}{result.message} (LoadModel took {time.monotonic() - started:.1f}s){RESET}\n")

    question = "What's the weather like in Paris right now?"
    request = pb.PredictOptions(
        UseTokenizerTemplate=True,
        Messages=[pb.Message(role="user", content=question)],
        Tools=json.dumps([WEATHER_TOOL]),
        Tokens=200,
        Temperature=0.0,
    )
    if tiny:
        request.Grammar = gbnf_literal(FORCED)
        request.LogitBias = tag_bias(stub)
    print(f"{BOLD}user:{RESET} {question}\n{BOLD}assistant:{RESET} ", end="", flush=True)
    calls: dict[int, dict[str, str]] = {}
    final = None
    for reply in stub.PredictStream(request, timeout=300):
        for delta in reply.chat_deltas:
            if delta.reasoning_content:
                print(f"{DIM}{delta.reasoning_content}{RESET}", end="", flush=True)
            if delta.content:
                print(delta.content, end="", flush=True)
            for call in delta.tool_calls:
                entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                if call.name:
                    entry["name"] = call.name
                    print(f"\n{CYAN}tool call {call.index}: {call.name}(", end="", flush=True)
                entry["arguments"] += call.arguments
                print(f"{CYAN}{call.arguments}{RESET}", end="", flush=True)
        final = reply
    if calls:
        print(f"{CYAN}){RESET}")
    if final is not None:
        print(
            f"\n{DIM}{final.prompt_tokens} prompt tokens, {final.tokens} completion tokens; "
            f"prompt {final.timing_prompt_processing:.0f} ms, "
            f"generation {final.timing_token_generation:.0f} ms{RESET}"
        )
    for index, call in sorted(calls.items()):
        print(f"parsed tool call {index}: {call['name']} {json.loads(call['arguments'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
