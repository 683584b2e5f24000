"""Time to the first content byte and to the first tool-call byte: this worker
(PredictStream, h2) against `vllm serve` (vLLM's OpenAI server, streaming chat
completions), measured in one run (issue 22).

    venv/bin/python -m bench.first_bytes [--requests 7] [--cases smollm2,hermes]

Two cases, each with its own pair of servers on the same model and engine
flags (the worker process stays up and loads the next model; `vllm serve` is
started per case):

* `smollm2`: SmolLM2-135M-Instruct (the real model, tools/real_models.py) with
  `tool_parser:pythonic` / `--tool-call-parser pythonic`, as the demo loads it:
  a plain question (first content byte) and the demo's weather question with a
  named tool_choice (first tool-call byte: the call's name; first argument byte).
* `hermes`: the tiny model with `tool_parser:hermes` / `--tool-call-parser
  hermes`, output forced by a grammar (tools/forcing.py; vLLM's server gets the
  same grammar as `structured_outputs.grammar` and the same `logit_bias`): a
  sentence of content, then a hermes `<tool_call>` whose arguments are ~450
  bytes long.

Requests alternate between the two servers (which goes first alternates per
round), one at a time, greedy, after warm-up, with a pause before each so the
idle engine's busy-polling has ended. Times are measured by this process from
the send to the arrival of the message that carries the byte: grpc's C-core
client for the worker, httpx for the OpenAI server. Medians with min-max.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.common import KV_CACHE_BYTES, ROOT, quiet_child_env
from bench.run import LOG_ROOT, RESULTS_DIR, _free_port, _stop_process
from tools.forcing import TAGS, WEATHER_TOOL, gbnf_literal

KV_OPTION = f"--kv-cache-memory-bytes:{KV_CACHE_BYTES}"
STRUCTURED = '{"enable_in_reasoning": true}'
QUESTION = "What is the capital of France? Answer in two sentences."
TOOL_QUESTION = "What's the weather like in Paris right now?"
NAMED = {"type": "function", "function": {"name": "get_weather"}}
LONG_CITY = (
    "Paris, the capital of France, on the Seine: 2 102 650 inhabitants in 2023 and "
    "about 12 million in its metropolitan area; the City of Light, with its twenty "
    "arrondissements spiralling out from the Louvre, its bridges, its parks and its "
    "cafes; the user wants the forecast for the whole afternoon, with rain by the hour, "
    "the wind, the temperature and whether an umbrella is needed on the way home"
)
HERMES_FORCED = (
    "I will look up the weather in Paris for you.\n<tool_call>\n"
    + json.dumps({"name": "get_weather", "arguments": {"city": LONG_CITY}})
    + "\n</tool_call>"
)


@dataclass
class Seen:
    """One streamed request as the client saw it (ms after the send)."""

    first_message_ms: float | None = None
    content_ms: float | None = None
    call_ms: float | None = None  # the first tool-call delta (its name)
    args_ms: float | None = None  # the first argument byte
    end_ms: float | None = None  # the stream's end
    content_bytes: int = 0
    args_bytes: int = 0
    args_bytes_before_last: int = 0  # argument bytes in messages before the last one
    messages: int = 0
    name: str = ""
    arguments: str = ""
    content: str = ""

    def note(self, at: float, content: str, calls: list[tuple[str, str]]) -> None:
        """One message: its content and (name, arguments) tool-call deltas."""
        self.messages += 1
        self.first_message_ms = self.first_message_ms or at
        if content:
            self.content_ms = self.content_ms or at
            self.content += content
        for name, arguments in calls:
            if name:
                self.call_ms = self.call_ms or at
                self.name = name
            if arguments:
                self.args_ms = self.args_ms or at
                self.arguments += arguments

    def close(self, at: float, last_args: int) -> None:
        self.end_ms = at
        self.content_bytes = len(self.content.encode())
        self.args_bytes = len(self.arguments.encode())
        self.args_bytes_before_last = self.args_bytes - last_args


@dataclass
class Ask:
    """One kind of request, as the worker and as vLLM's OpenAI server get it."""

    name: str
    messages: list[dict[str, str]]
    max_tokens: int
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    forced: str | None = None
    metrics: tuple[str, ...] = ("content_ms",)


@dataclass
class Case:
    name: str
    model: Callable[[], str]
    worker_options: list[str]
    serve_flags: list[str]
    asks: list[Ask]
    results: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)


def _smollm2() -> str:
    from tools import real_models

    return str(real_models.smollm2())


def _tiny() -> str:
    from tools.tiny_model import build_tiny_model, default_model_dir

    return str(build_tiny_model(default_model_dir()))


CASES = {
    "smollm2": Case(
        "smollm2",
        _smollm2,
        ["tool_parser:pythonic", KV_OPTION],
        ["--tool-call-parser", "pythonic", "--enable-auto-tool-choice"],
        [
            Ask("answer", [{"role": "user", "content": QUESTION}], 64),
            Ask(
                "named call",
                [{"role": "user", "content": TOOL_QUESTION}],
                100,
                tools=[WEATHER_TOOL],
                tool_choice=NAMED,
                metrics=("call_ms", "args_ms"),
            ),
        ],
    ),
    "hermes": Case(
        "hermes",
        _tiny,
        ["tool_parser:hermes", "reasoning_parser:none", KV_OPTION],
        ["--tool-call-parser", "hermes", "--enable-auto-tool-choice"],
        [
            Ask(
                "long hermes call",
                [{"role": "user", "content": "What is the weather in Paris?"}],
                1500,
                tools=[WEATHER_TOOL],
                forced=HERMES_FORCED,
                metrics=("content_ms", "call_ms", "args_ms"),
            )
        ],
    ),
}


# ---- the worker ------------------------------------------------------------------------


class WorkerSide:
    def __init__(self, log: IO[bytes]) -> None:
        import grpc

        from backend.gen import backend_pb2_grpc

        self.addr = f"127.0.0.1:{_free_port()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backend", "--addr", self.addr],
            cwd=ROOT,
            env=quiet_child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.channel = grpc.insecure_channel(self.addr)
        self.stub = backend_pb2_grpc.BackendStub(self.channel)
        self.bias = ""
        deadline = time.monotonic() + 180
        from backend.gen import backend_pb2 as pb

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.proc.returncode}")
            try:
                self.stub.Health(pb.HealthMessage(), timeout=2)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise TimeoutError("worker not healthy") from None
                time.sleep(0.3)

    def load(self, model: str, options: list[str]) -> None:
        from backend.gen import backend_pb2 as pb

        result = self.stub.LoadModel(
            pb.ModelOptions(
                Model=model, DType="float32", MaxModelLen=2048, EnforceEager=True, Options=options
            ),
            timeout=900,
        )
        if not result.success:
            raise RuntimeError(f"LoadModel: {result.message}")
        self.bias = ""

    def tag_bias(self) -> dict[str, int]:
        """+100 on each tag's token id (tools/forcing.py), from this model's tokenizer."""
        from backend.gen import backend_pb2 as pb

        out = {}
        for tag in TAGS:
            tokens = self.stub.TokenizeString(pb.PredictOptions(Prompt=tag)).tokens
            if len(tokens) != 1:
                raise ValueError(f"{tag} is not one token in this model's tokenizer")
            out[str(tokens[0])] = 100
        return out

    def ask(self, ask: Ask, bias: dict[str, int]) -> Seen:
        from backend.gen import backend_pb2 as pb

        req = pb.PredictOptions(
            UseTokenizerTemplate=True,
            Messages=[pb.Message(**m) for m in ask.messages],
            Tokens=ask.max_tokens,
            Temperature=0.0,
        )
        if ask.tools is not None:
            req.Tools = json.dumps(ask.tools)
        if ask.tool_choice is not None:
            req.ToolChoice = json.dumps(ask.tool_choice)
        if ask.forced is not None:
            req.Grammar = gbnf_literal(ask.forced)
            req.LogitBias = json.dumps(bias)
        seen = Seen()
        last_args = 0
        sent = time.perf_counter()
        for reply in self.stub.PredictStream(req, timeout=300):
            at = (time.perf_counter() - sent) * 1000.0
            content = "".join(d.content for d in reply.chat_deltas) or reply.message.decode()
            calls = [(t.name, t.arguments) for d in reply.chat_deltas for t in d.tool_calls]
            seen.note(at, content, calls)
            last_args = sum(len(a.encode()) for _, a in calls)
        seen.close((time.perf_counter() - sent) * 1000.0, last_args)
        return seen

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.channel.close()
        _stop_process(self.proc, "worker")


# ---- vLLM's OpenAI server --------------------------------------------------------------


class ServeSide:
    def __init__(self, model: str, flags: list[str], log: IO[bytes]) -> None:
        import httpx

        port = _free_port()
        self.model = model
        self.url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model,
            "--dtype", "float32",
            "--max-model-len", "2048",
            "--enforce-eager",
            "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
            "--structured-outputs-config", STRUCTURED,
            "--host", "127.0.0.1", "--port", str(port),
            *flags,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=quiet_child_env(), stdout=log, stderr=subprocess.STDOUT
        )
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(300.0))
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get("/health", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("vllm serve not healthy")
            time.sleep(0.5)

    def ask(self, ask: Ask, bias: dict[str, int]) -> Seen:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": ask.messages,
            "max_tokens": ask.max_tokens,
            "temperature": 0.0,
            "stream": True,
        }
        if ask.tools is not None:
            body["tools"] = ask.tools
        if ask.tool_choice is not None:
            body["tool_choice"] = ask.tool_choice
        if ask.forced is not None:
            body["structured_outputs"] = {"grammar": gbnf_literal(ask.forced)}
            body["logit_bias"] = bias
        seen = Seen()
        last_args = 0
        sent = time.perf_counter()
        with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"vllm serve: {response.status_code} {response.read()[:500]!r}")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                at = (time.perf_counter() - sent) * 1000.0
                if line == "data: [DONE]":
                    break
                choices = json.loads(line[6:]).get("choices") or [{}]
                delta = choices[0].get("delta") or {}
                calls = [
                    ((t.get("function") or {}).get("name") or "",
                     (t.get("function") or {}).get("arguments") or "")
                    for t in delta.get("tool_calls") or ()
                ]  # fmt: skip
                seen.note(at, delta.get("content") or "", calls)
                last_args = sum(len(a.encode()) for _, a in calls)
        seen.close((time.perf_counter() - sent) * 1000.0, last_args)
        return seen

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        _stop_process(self.proc, "vllm serve")


# ---- the run ---------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {msg}", flush=True)


def run_case(
    case: Case, worker: WorkerSide, log_dir: Path, requests: int, warmup: int, settle: float
) -> None:
    model = case.model()
    _say(f"{case.name}: worker LoadModel {model} {case.worker_options}")
    worker.load(model, case.worker_options)
    _say(f"{case.name}: starting vllm serve {' '.join(case.serve_flags)}")
    with open(log_dir / f"serve-{case.name}.log", "wb") as log:
        serve = ServeSide(model, case.serve_flags, log)
        try:
            bias = worker.tag_bias() if any(a.forced for a in case.asks) else {}
            sides: dict[str, Any] = {"worker": worker, "vllm serve": serve}
            for ask in case.asks:
                per_side: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
                for _ in range(warmup):
                    for side in sides.values():
                        side.ask(ask, bias)
                for i in range(requests):
                    order = list(sides) if i % 2 == 0 else list(reversed(sides))
                    for key in order:
                        time.sleep(settle)
                        seen = sides[key].ask(ask, bias)
                        per_side[key].append({**asdict(seen), "loadavg_1m": os.getloadavg()[0]})
                case.results[ask.name] = per_side
                _say(f"{case.name} / {ask.name}: {_summary_line(ask, per_side)}")
        finally:
            serve.stop()


def _stats(values: list[float | None]) -> dict[str, float] | None:
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _cell(s: dict[str, float] | None) -> str:
    if s is None:
        return "-"
    return f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]"


def _summary_line(ask: Ask, per_side: dict[str, list[dict[str, Any]]]) -> str:
    parts = []
    for metric in (*ask.metrics, "end_ms"):
        cells = ", ".join(
            f"{side} {_cell(_stats([r[metric] for r in rows]))}" for side, rows in per_side.items()
        )
        parts.append(f"{metric}: {cells}")
    return "; ".join(parts)


def table(cases: list[Case]) -> str:
    lines = [
        f"{'case':8} {'request':18} {'time to (ms)':22} {'worker (h2)':>24} {'vllm serve':>24}",
    ]
    for case in cases:
        for ask in case.asks:
            rows = case.results.get(ask.name)
            if not rows:
                continue
            for metric in (*ask.metrics, "end_ms"):
                label = {
                    "content_ms": "first content byte",
                    "call_ms": "first tool-call byte",
                    "args_ms": "first argument byte",
                    "end_ms": "end of stream",
                }[metric]
                lines.append(
                    f"{case.name:8} {ask.name:18} {label:22} "
                    f"{_cell(_stats([r[metric] for r in rows['worker']])):>24} "
                    f"{_cell(_stats([r[metric] for r in rows['vllm serve']])):>24}"
                )
            outputs = {
                (r["content"], r["name"], r["arguments"]) for side in rows.values() for r in side
            }
            lines.append(
                f"{'':8} {'':18} both servers streamed the same output: "
                f"{'yes' if len(outputs) == 1 else f'NO ({len(outputs)} different)'}"
            )
            for side in ("worker", "vllm serve"):
                r = rows[side][-1]
                if r["args_bytes"]:
                    lines.append(
                        f"{'':8} {'':18} {side}: {r['args_bytes_before_last']} of "
                        f"{r['args_bytes']} argument bytes before the last message; "
                        f"{r['messages']} messages"
                    )
    lines.append("(median [min-max] over the requests; ms from the send, as the client saw it)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.first_bytes", description=__doc__)
    p.add_argument("--requests", type=int, default=7, help="measured requests per server (7)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cases", default="smollm2,hermes")
    p.add_argument("--settle", type=float, default=1.5, help="pause before each request (s)")
    p.add_argument("--out", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    chosen = [CASES[n.strip()] for n in args.cases.split(",") if n.strip()]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = LOG_ROOT / f"first-bytes-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    _say(f"first bytes: {args.requests} requests per server and request kind; logs {log_dir}")
    with open(log_dir / "worker.log", "wb") as log:
        worker = WorkerSide(log)
        try:
            for case in chosen:
                run_case(case, worker, log_dir, args.requests, args.warmup, args.settle)
        finally:
            worker.stop()
    print()
    print(table(chosen))
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    out = Path(args.out) / f"first-bytes-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "meta": {
                    "timestamp": stamp,
                    "argv": sys.argv[1:] if argv is None else argv,
                    "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(),
                    "logs": str(log_dir),
                },
                "cases": {
                    c.name: {
                        "worker_options": c.worker_options,
                        "serve_flags": c.serve_flags,
                        "asks": {a.name: asdict(a) for a in c.asks},
                        "results": c.results,
                    }
                    for c in chosen
                },
            },
            indent=1,
        )
    )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
