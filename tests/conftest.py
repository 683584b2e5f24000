"""Shared fixtures: the tiny local model, and a real worker process over gRPC."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from tools.tiny_model import build_tiny_model, default_model_dir

    return build_tiny_model(default_model_dir())


def free_port() -> int:
    """A loopback port nothing is bound to, for a server started next.

    Not one from bind(0): that is an ephemeral port, free only until a client
    connection takes it as its local port, and a worker binds its port ~20 s
    later (after importing vLLM). With test_inbound's thousands of connections
    running in a suite beside this one, a worker failed with EADDRINUSE. A
    port below the kernel's ephemeral range is never handed to a client."""
    low = _ephemeral_low()
    for _ in range(1000):
        port = random.randrange(20_000, low) if low > 21_000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free loopback port below the ephemeral range")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # not Linux: bind(0)


class Worker:
    """`python -m backend` in its own process, driven over a real gRPC channel."""

    def __init__(self, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        import grpc

        from backend.gen import backend_pb2_grpc

        self.addr = f"127.0.0.1:{free_port()}"
        self.log_path = (
            Path(os.environ.get("PYTEST_WORKER_LOG_DIR", "/tmp"))
            / f"worker-{self.addr.replace(':', '_')}-{os.getpid()}-{time.monotonic_ns()}.log"
        )
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the worker
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backend", "--addr", self.addr, *(args or [])],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.channel = grpc.insecure_channel(self.addr)
        self.stub = backend_pb2_grpc.BackendStub(self.channel)
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 240.0) -> None:
        import grpc

        from backend.gen import backend_pb2 as pb

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.stub.Health(pb.HealthMessage(), timeout=2).message == b"OK":
                    return
            except grpc.RpcError:
                time.sleep(0.2)
        raise TimeoutError(f"worker not healthy in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self._log.close()


KV_CACHE_OPTION = f"--kv-cache-memory-bytes:{256 * 2**20}"


def tiny_load_options(model_dir: Path, *options: str, kv_cache: bool = True, **fields):
    """ModelOptions for the tiny model on this CPU machine.

    float32: bfloat16 dies with SIGILL here. An explicit KV-cache size rather
    than GPUMemoryUtilization: on CPU that fraction applies to NUMA node 0's
    memory (which varies) minus what the worker already uses, so small values
    fail; 256 MiB holds 256k tokens of this model. Eager mode: torch.compile
    would add ~20 s per start.
    """
    from backend.gen import backend_pb2 as pb

    opts = [KV_CACHE_OPTION, *options] if kv_cache else list(options)
    base = dict(
        Model=str(model_dir), DType="float32", MaxModelLen=2048, EnforceEager=True, Options=opts
    )
    base.update(fields)
    return pb.ModelOptions(**base)


@pytest.fixture(scope="session")
def worker() -> Iterator[Worker]:
    # --debug-requests: tests that stop the engine core wait for the
    # "first output" line it logs (tests/engine_control.py).
    w = Worker(args=["--debug-requests"])
    yield w
    w.stop()
