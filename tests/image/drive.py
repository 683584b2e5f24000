"""Drive a worker started from an unpacked image over gRPC, as the gateway would.

    venv/bin/python tests/image/drive.py --addr 127.0.0.1:PORT --model DIR [--tokens 8]

Run from the repo root with the repo's venv (it uses the repo's generated stubs,
backend/gen, as the client): Health until OK, LoadModel of the tiny model (float32,
max_model_len 2048, eager, 256 MiB KV cache), Predict (Tokens=N, IgnoreEOS) which must
return exactly N tokens, then Free. Prints each step's time; exits non-zero on any
failure. Not a pytest module (tests/image is not collected by `make test`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc

from backend.gen import backend_pb2 as pb
from backend.gen import backend_pb2_grpc


def log(msg: str) -> None:
    print(f"[drive] {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"[drive] FAILED: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--model", required=True, help="model directory as the worker sees it")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--health-timeout", type=float, default=180.0)
    ap.add_argument("--load-timeout", type=float, default=900.0)
    args = ap.parse_args()

    channel = grpc.insecure_channel(args.addr)
    stub = backend_pb2_grpc.BackendStub(channel)
    timings: dict[str, float] = {}

    t0 = time.monotonic()
    deadline = t0 + args.health_timeout
    last_err = ""
    while True:
        try:
            reply = stub.Health(pb.HealthMessage(), timeout=2)
            if reply.message == b"OK":
                break
            last_err = f"Health answered {reply.message!r}"
        except grpc.RpcError as e:
            last_err = f"{e.code().name}: {e.details()}"
        if time.monotonic() > deadline:
            fail(f"worker not healthy within {args.health_timeout:.0f}s ({last_err})")
        time.sleep(0.25)
    timings["health"] = time.monotonic() - t0
    log(f"Health OK after {timings['health']:.1f}s")

    t0 = time.monotonic()
    result = stub.LoadModel(
        pb.ModelOptions(
            Model=args.model,
            DType="float32",
            MaxModelLen=2048,
            EnforceEager=True,
            Options=["--kv-cache-memory-bytes:268435456"],
        ),
        timeout=args.load_timeout,
    )
    timings["load"] = time.monotonic() - t0
    if not result.success:
        fail(f"LoadModel: {result.message}")
    log(f"LoadModel OK in {timings['load']:.1f}s: {result.message}")

    t0 = time.monotonic()
    reply = stub.Predict(
        pb.PredictOptions(Prompt="Hello from the image test", Tokens=args.tokens, IgnoreEOS=True),
        timeout=300,
    )
    timings["predict"] = time.monotonic() - t0
    if reply.tokens != args.tokens:
        fail(f"Predict returned {reply.tokens} tokens, expected {args.tokens}")
    log(
        f"Predict OK in {timings['predict']:.2f}s: {reply.tokens} tokens, "
        f"{len(reply.message)} bytes of text"
    )

    t0 = time.monotonic()
    result = stub.Free(pb.HealthMessage(), timeout=120)
    timings["free"] = time.monotonic() - t0
    if not result.success:
        fail(f"Free: {result.message}")
    log(f"Free OK in {timings['free']:.1f}s")
    channel.close()
    log("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))


if __name__ == "__main__":
    main()
