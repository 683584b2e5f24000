"""Target G: vLLM's own gRPC server (smg's `VllmEngineServicer` on grpc.aio).

vLLM 0.32 ships the launcher (`python -m vllm.entrypoints.launchers.grpc_server`,
what `vllm serve --grpc` runs) but not the servicer: that is the
`smg-grpc-servicer` package with its `smg-grpc-proto` stubs. They stay out of
the venv and out of git; install them once into a directory of their own:

    venv/bin/pip install --no-deps --target .cache/smg-grpc smg-grpc-servicer smg-grpc-proto

(`BENCH_SMG_DIR` names another directory). Without it the target is skipped
with a message. Both the server and this client run with that directory on
PYTHONPATH; the generated stubs come with `smg-grpc-proto`.

Its `Generate` takes text (tokenized by the engine's renderer, as A and the
worker do with a raw prompt) and streams token ids: it never detokenizes
(`SamplingParams(detokenize=False)`), which A, B and C all do.

The client: `python -m bench.vllm_grpc --fd N --addr HOST:PORT`, a grpc.aio
channel like target B's, the same raw workloads (prompt, greedy, ignore_eos,
max_tokens).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    Record,
    Workload,
    aio_channel,
    child_fd_arg,
    prompt_text,
    run_async,
    run_closed_loop,
    serve_commands,
)

LAUNCHER = "vllm.entrypoints.launchers.grpc_server"
INSTALL = "venv/bin/pip install --no-deps --target .cache/smg-grpc smg-grpc-servicer smg-grpc-proto"


def smg_dir() -> Path:
    return Path(os.environ.get("BENCH_SMG_DIR") or ROOT / ".cache" / "smg-grpc")


def missing() -> str | None:
    """Why target G cannot run here, or None."""
    where = smg_dir()
    for package in ("smg_grpc_servicer", "smg_grpc_proto"):
        if not (where / package).is_dir():
            return f"{package} not found in {where} (install: {INSTALL})"
    return None


def env_with_smg(env: dict[str, str]) -> dict[str, str]:
    """`env` with the package directory first on PYTHONPATH."""
    out = dict(env)
    out["PYTHONPATH"] = str(smg_dir()) + (
        os.pathsep + out["PYTHONPATH"] if out.get("PYTHONPATH") else ""
    )
    return out


def server_command(
    model_dir: str, max_model_len: int, port: int, kv_cache_bytes: int, extra: list[str]
) -> list[str]:
    """The launcher with the engine flags every other target gets (see OpenAITarget)."""
    cmd = [
        sys.executable, "-m", LAUNCHER,
        "--model", model_dir,
        "--dtype", "float32",
        "--max-model-len", str(max_model_len),
        "--enforce-eager",
        "--kv-cache-memory-bytes", str(kv_cache_bytes),
        "--structured-outputs-config", '{"enable_in_reasoning": true}',
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    for option in extra:
        key, _, value = option.partition(":")
        cmd += [f"--{key.removeprefix('--').replace('_', '-')}", value]
    return cmd


def serving(addr: str, timeout: float = 2.0) -> bool:
    """Standard gRPC health: SERVING once the engine is up and its warm-up done."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


async def amain(fd: int, addr: str) -> None:

    # On PYTHONPATH only at run time (smg_dir()): not in the venv.
    from smg_grpc_proto import vllm_engine_pb2 as vpb  # type: ignore[import-not-found]
    from smg_grpc_proto import vllm_engine_pb2_grpc as vgrpc  # type: ignore[import-not-found]

    channel = aio_channel(addr)
    stub = vgrpc.VllmEngineStub(channel)
    ids = itertools.count()

    async def run(cmd: dict[str, Any]) -> dict[str, Any]:
        workload = Workload.from_json(cmd["workload"])
        if workload.kind != "raw":
            raise ValueError("the vLLM gRPC client runs raw-prompt workloads only")

        async def one(i: int, rec: Record) -> None:
            request = vpb.GenerateRequest(
                request_id=f"bench-{next(ids)}",
                text=prompt_text(i),
                sampling_params=vpb.SamplingParams(
                    temperature=0.0, max_tokens=workload.tokens, ignore_eos=True
                ),
                stream=True,
            )
            rec.sent = time.perf_counter()
            stamps = rec.stamps
            async for response in stub.Generate(request, timeout=600):
                now = time.perf_counter()
                rec.messages += 1
                # Chunks carry each step's new ids; the Complete that follows
                # the last chunk repeats that chunk's ids (a client accumulates).
                if response.HasField("chunk") and response.chunk.token_ids:
                    stamps.append(now)
                    rec.tokens += len(response.chunk.token_ids)

        return await run_closed_loop(workload, one)

    try:
        await serve_commands(fd, {"run": run})
    finally:
        await channel.close()


def main() -> None:
    argv = sys.argv
    run_async(amain(child_fd_arg(argv), argv[argv.index("--addr") + 1]))


if __name__ == "__main__":
    main()
