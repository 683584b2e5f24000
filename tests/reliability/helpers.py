"""Process, memory and shared-memory probes for the reliability tests.

Which processes are the engine's is decided in `tests/engine_control.py`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
import psutil

from backend.gen import backend_pb2 as pb
from tests.conftest import Worker, tiny_load_options
from tests.engine_control import ENGINE_CORE, MODEL_RUNNER, descendants, engine_processes

SHM = Path("/dev/shm")


def running(p: psutil.Process) -> bool:
    """Alive and not a zombie (a zombie has exited and holds no memory)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def zombies(pid: int) -> list[psutil.Process]:
    out = []
    for p in descendants(pid):
        with contextlib.suppress(psutil.Error):
            if p.status() == psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def survivors(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to `timeout` s for the processes to exit; those still running."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if running(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def describe(procs: Iterable[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid}:{p.name()}:{p.status()}")
        except psutil.Error:
            out.append(f"{p.pid}:gone")
    return out


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until predicate() was true, or None if it never was within timeout."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start >= timeout:
            return None
        time.sleep(interval)


def tree_rss(pid: int) -> dict[str, int]:
    """RSS bytes of the worker and of its whole process tree."""
    worker = psutil.Process(pid).memory_info().rss
    total = worker
    for p in descendants(pid):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return {"worker": worker, "tree": total}


def role_uss(pid: int) -> dict[str, int]:
    """Private memory (USS) of the worker, the engine core and the model runner(s).

    USS, not RSS: the engine processes share a /dev/shm ring buffer (~200 MiB
    here) whose pages count in the RSS of every process that maps them, and
    grow as they are first touched; they are not anyone's leak.
    """
    out = dict.fromkeys(("engine core", "model runner"), 0)
    out["worker"] = psutil.Process(pid).memory_full_info().uss
    for p in engine_processes(pid):
        with contextlib.suppress(psutil.Error):
            name = p.name()
            role = (
                "engine core"
                if name.startswith(ENGINE_CORE)
                else "model runner"
                if name.startswith(MODEL_RUNNER)
                else None
            )
            if role:
                out[role] += p.memory_full_info().uss
    return out


def shm_names() -> set[str]:
    return {p.name for p in SHM.iterdir()} if SHM.is_dir() else set()


def shm_used_by(pids: Iterable[int]) -> set[str]:
    """/dev/shm entries mapped or held open by these processes.

    /dev/shm is shared with everything else on the machine (other engines,
    other tests), so leaks are judged only on entries our processes used.
    """
    names: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                if "/dev/shm/" in line:
                    names.add(line.split("/dev/shm/", 1)[1].split()[0])
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("/dev/shm/"):
                        names.add(target[len("/dev/shm/") :])
    return names


def tree_pids(pid: int) -> list[int]:
    return [pid, *(p.pid for p in descendants(pid))]


def load(worker: Worker, model_dir: Path, *options: str, **fields) -> pb.Result:
    result = worker.stub.LoadModel(tiny_load_options(model_dir, *options, **fields), timeout=600)
    assert result.success, f"{result.message}\n{worker.log_tail()}"
    return result


def greedy(prompt: str = "The weather in Paris is", **kw) -> pb.PredictOptions:
    base = dict(Prompt=prompt, Tokens=24, Temperature=0.0, IgnoreEOS=True)
    base.update(kw)
    return pb.PredictOptions(**base)


def rpc_code(fn: Callable[[], object]) -> tuple[grpc.StatusCode | None, str, float]:
    """(status code or None on success, details, seconds) of one call."""
    start = time.monotonic()
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details() or "", time.monotonic() - start
    return None, "", time.monotonic() - start


def state(worker: Worker) -> int:
    return worker.stub.Status(pb.HealthMessage(), timeout=10).state


def state_name(value: int) -> str:
    return pb.StatusResponse.State.Name(value)


def log_text(worker: Worker) -> str:
    worker._log.flush()
    return worker.log_path.read_text(errors="replace")
