"""Run the tiny model multi-process through the real worker and compare greedy output.

    venv/bin/python -m tools.parallel_check                 # TP=2, PP=2 (mp), one machine
    unshare -n sh -c 'ip link set lo up && venv/bin/python -m tools.parallel_check --multi-node'
    unshare -n sh -c 'ip link set lo up && venv/bin/python -m tools.parallel_check --ray'

Each configuration gets its own worker process (`python -m backend`), loaded
over gRPC with the ModelOptions a gateway would send — `TensorParallelSize`,
Options `pipeline_parallel_size:2`, `distributed_executor_backend:mp|ray`,
`nnodes`/`node_rank`/`master_addr` — so this exercises the passthrough, not
vLLM alone. Greedy (temperature 0, IgnoreEOS) completions of fixed prompts
must equal those of TP=1, and one VLLM::Worker process per rank must really
have started. Configurations vLLM's CPU build cannot run are expected to fail
with their known root cause (found in the worker's log); the day one starts
working the script says so.

vLLM's CPU backend binds each rank's OpenMP threads to the cores listed in
VLLM_CPU_OMP_THREADS_BIND, ranks separated by `|` (vllm/utils/ompmultiprocessing.py);
its `auto` setting wants one NUMA node per rank, which a one-node machine
lacks. `0|1` gives each of two ranks one core here.

`--multi-node` plays two nodes on this machine: the worker is node 0, a
`run.sh serve --headless --node-rank 1` follower is node 1, talking over
TCP. `--ray` starts a Ray head and loads with the Ray executor (install
`ray` first; it is not a requirement). Both open TCP ports that vLLM, torch
and Ray bind on every interface, so they refuse to run outside a network
namespace that has only loopback (`unshare -n`, as above).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from backend.gen import backend_pb2 as pb
from tests.conftest import ROOT, Worker, tiny_load_options
from tests.reliability.helpers import MODEL_RUNNER, engine_processes

PROMPTS = ("The weather in Paris is", "Once upon a time", "1, 2, 3,")
LOG_DIR = Path(os.environ.get("PYTEST_WORKER_LOG_DIR", "/tmp"))


@dataclass
class Config:
    name: str
    options: tuple[str, ...] = ()
    fields: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    ranks: int = 1  # VLLM::Worker processes under the worker (and follower)
    # `run.sh serve` arguments of a follower node started before the worker.
    follower: tuple[str, ...] = ()
    follower_env: dict[str, str] = field(default_factory=dict)
    # A known vLLM limitation: the text its failure leaves in the worker log.
    expect_failure: str = ""
    failure_seen: bool = False  # set by run(): expect_failure was in the worker log


def configs(multi_node: bool, ray: bool) -> list[Config]:
    two_ranks = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    pp2 = ("pipeline_parallel_size:2", "distributed_executor_backend:mp")
    out = [
        Config("TP=1 (baseline)"),
        Config(
            "TP=2 mp", ("distributed_executor_backend:mp",), {"TensorParallelSize": 2}, two_ranks, 2
        ),
        # vLLM allocates the buffer a later pipeline stage receives activations
        # in only in its warm-up forward pass, which the CPU runner skips in
        # eager mode (cpu_model_runner.warming_up_model): eager PP=2 dies at
        # its first step (gpu_model_runner.sync_and_gather_intermediate_tensors).
        Config(
            "PP=2 mp eager",
            pp2,
            {},
            two_ranks,
            2,
            expect_failure="assert self.intermediate_tensors is not None",
        ),
        Config("PP=2 mp compiled", pp2, {"EnforceEager": False}, two_ranks, 2),
    ]
    if multi_node:
        loopback = {"VLLM_HOST_IP": "127.0.0.1"}
        out.append(
            Config(
                "TP=2 two nodes",
                (
                    "distributed_executor_backend:mp",
                    "nnodes:2",
                    "node_rank:0",
                    "master_addr:127.0.0.1",
                ),
                {"TensorParallelSize": 2},
                {**loopback, "VLLM_CPU_OMP_THREADS_BIND": "0"},
                2,
                follower=(
                    "--tensor-parallel-size=2",
                    "--distributed-executor-backend=mp",
                    "--nnodes=2",
                    "--node-rank=1",
                    "--master-addr=127.0.0.1",
                    "--headless",
                ),
                follower_env={**loopback, "VLLM_CPU_OMP_THREADS_BIND": "1"},
            )
        )
    if ray:
        # vLLM's Ray executor places each rank on a Ray "GPU" resource named
        # by the platform's `ray_device_key`; CpuPlatform leaves it "", and
        # vllm/v1/executor/ray_utils.py initialize_ray_cluster refuses.
        out.append(
            Config(
                "TP=2 ray",
                ("distributed_executor_backend:ray",),
                {"TensorParallelSize": 2},
                {**two_ranks, "RAY_ADDRESS": "127.0.0.1:6379"},
                2,
                expect_failure="current platform cpu does not support ray",
            )
        )
    return out


def _follower(config: Config, model_dir: Path) -> subprocess.Popen[bytes]:
    """`run.sh serve MODEL <the engine flags of tiny_load_options> <config.follower>`."""
    log = open(LOG_DIR / f"follower-{os.getpid()}-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
    argv = [
        str(ROOT / "run.sh"),
        "serve",
        str(model_dir),
        "--dtype=float32",
        "--max-model-len=2048",
        "--enforce-eager",
        f"--kv-cache-memory-bytes={256 * 2**20}",
        *config.follower,
    ]
    return subprocess.Popen(
        argv,
        env={**os.environ, **config.follower_env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(10)


def run(config: Config, model_dir: Path, tokens: int) -> tuple[list[str] | None, str]:
    """(greedy completions or None, a one-line account) for one configuration."""
    follower = _follower(config, model_dir) if config.follower else None
    worker = Worker(env=config.env)
    try:
        started = time.monotonic()
        result = worker.stub.LoadModel(
            tiny_load_options(model_dir, *config.options, **config.fields), timeout=900
        )
        load_s = time.monotonic() - started
        if not result.success:
            return None, f"LoadModel failed after {load_s:.0f}s: {result.message[:200]}"
        pids = [worker.proc.pid] + ([follower.pid] if follower else [])
        runners = [
            p for pid in pids for p in engine_processes(pid) if p.name().startswith(MODEL_RUNNER)
        ]
        account = f"load {load_s:.1f}s, {len(runners)} {MODEL_RUNNER} process(es)"
        started = time.monotonic()
        try:
            texts = [
                worker.stub.Predict(
                    pb.PredictOptions(Prompt=p, Tokens=tokens, Temperature=0.0, IgnoreEOS=True),
                    timeout=600,
                ).message.decode()
                for p in PROMPTS
            ]
        except grpc.RpcError as e:
            return None, f"{account}; Predict: {e.code().name}: {(e.details() or '')[:120]}"
        gen_s = time.monotonic() - started
        account += f", {len(PROMPTS)}x{tokens} tokens in {gen_s:.1f}s"
        if len(runners) != config.ranks:
            return None, f"{account}: expected {config.ranks} rank process(es)"
        return texts, account
    finally:
        worker.stop()
        if follower is not None:
            _stop(follower)
        if config.expect_failure:
            log = worker.log_path.read_text(errors="replace")
            config.failure_seen = config.expect_failure in log


def _loopback_only() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def _start_ray() -> subprocess.Popen[bytes]:
    ray = Path(sys.executable).parent / "ray"
    if not ray.exists() or shutil.which(str(ray)) is None:
        raise SystemExit("--ray: `venv/bin/pip install ray` first (not a requirement)")
    log_path = LOG_DIR / f"ray-head-{os.getpid()}.log"
    head = subprocess.Popen(
        [
            str(ray),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            "--port=6379",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--block",
        ],
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        stdout=open(log_path, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while "Ray runtime started" not in log_path.read_text(errors="replace"):
        if head.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the Ray head did not start: {log_path}")
        time.sleep(1)
    return head


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--multi-node", action="store_true", help="also TP=2 over two nodes")
    parser.add_argument("--ray", action="store_true", help="also TP=2 with the Ray executor")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--only", help="run only the configurations whose name contains this")
    args = parser.parse_args(argv)
    if (args.multi_node or args.ray) and not _loopback_only():
        raise SystemExit(
            "--multi-node/--ray open ports on every interface: run inside "
            "`unshare -n sh -c 'ip link set lo up && ...'` (loopback only)"
        )
    from tools.tiny_model import build_tiny_model, default_model_dir

    model_dir = build_tiny_model(default_model_dir())
    head = _start_ray() if args.ray else None
    baseline: list[str] | None = None
    failed = 0
    try:
        for config in configs(args.multi_node, args.ray):
            if args.only and args.only not in config.name and baseline is not None:
                continue
            texts, account = run(config, model_dir, args.tokens)
            if texts is None and config.failure_seen:
                verdict, account = "fails as known", f"{account} [log: {config.expect_failure!r}]"
            elif texts is None:
                verdict = "FAIL"
            elif config.expect_failure:
                verdict = "WORKS NOW (known failure gone)"
            elif baseline is None:
                baseline, verdict = texts, "baseline"
            elif texts == baseline:
                verdict = "SAME as TP=1"
            else:
                verdict = "DIFFERENT from TP=1"
            failed += verdict in ("FAIL", "DIFFERENT from TP=1")
            print(f"{config.name:18} {verdict:16} {account}", flush=True)
            for prompt, text in zip(PROMPTS, texts or (), strict=False):
                print(f"    {prompt!r} -> {text!r}", flush=True)
    finally:
        if head is not None:
            _stop(head)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
