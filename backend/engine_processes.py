"""The engine's processes: who may signal them, and what a stopped engine leaves behind.

The worker alone decides when its engine stops (`detach_engine_processes`): a
signal to the worker's process group must not reach the engine core directly.
vLLM stops its engine processes but does not always wait for them, and a core
killed mid-teardown leaves its /dev/shm ring buffer behind. These functions reap
and clean up after `Engine.shutdown`, and give the core its whole stop time.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from typing import Any

from vllm import envs

log = logging.getLogger(__name__)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# The worker's pid, for its engine core to check that the worker started it.
_PARENT_ENV = "BACKEND_ENGINE_PARENT_PID"
_original_run: Any = None


def detach_engine_processes() -> None:
    """Start every later engine core in its own process group, dying with the worker.

    Why: a signal to the worker's process group — Ctrl-C in a terminal, a
    gateway or `make demo` stopping the worker with kill(-pgid) — also reached
    the engine core and its model runner. They stopped on their own while the
    worker began its grace period: the model runner exited first, the core
    logged "Worker proc … died unexpectedly" and a fatal-error traceback, the
    worker's output handler an EngineDeadError, and the requests in flight were
    cut at once instead of getting their grace period (issue 26). In their own
    group only the worker signals them, in the order `Engine.shutdown` keeps.

    How: vLLM starts the core with `EngineCoreProc.run_engine_core` as the
    target of a multiprocessing Process (spawned on CPU: vLLM's CPU platform
    forces spawn; forked elsewhere). That target is replaced by
    `run_engine_core_detached`, which the child runs first — in both start
    methods — before handing over to vLLM's. The core's own children (the
    model runner) follow the core's group and end with it (vLLM's death pipe).

    Leaving the group loses what a group-wide SIGKILL did for free (no engine
    outlives a worker killed that way), so the core asks the kernel for SIGKILL
    when its parent thread dies (PR_SET_PDEATHSIG): a worker killed by any
    means takes its engine with it — also when only the worker's pid was
    killed, which used to leave the engine running. The parent *thread*
    counts: vLLM starts the core from the thread that calls
    `AsyncLLM.from_engine_args`, a thread of asyncio's default executor
    (`Engine.start`), which lives until the event loop closes, after the engine
    is stopped. Linux only; elsewhere a no-op.
    """
    global _original_run
    if _original_run is not None or not sys.platform.startswith("linux"):
        return
    from vllm.v1.engine.core import EngineCoreProc

    _original_run = EngineCoreProc.run_engine_core
    os.environ[_PARENT_ENV] = str(os.getpid())
    EngineCoreProc.run_engine_core = staticmethod(run_engine_core_detached)  # type: ignore[method-assign]


def run_engine_core_detached(*args: Any, **kwargs: Any) -> Any:
    """The engine core process's entry point: leave the worker's process group,
    die with the worker, then run vLLM's own entry point."""
    _leave_worker_group()
    original = _original_run  # inherited when forked
    if original is None:  # spawned: a fresh interpreter, whose vLLM is untouched
        from vllm.v1.engine.core import EngineCoreProc

        original = EngineCoreProc.run_engine_core
    return original(*args, **kwargs)


def _leave_worker_group() -> None:
    worker = int(os.environ.get(_PARENT_ENV) or 0)
    if os.getppid() != worker:
        return  # not started by the worker that set this up: leave it as it is
    try:
        os.setpgid(0, 0)
    except OSError:
        return  # still in the worker's group: as before, nothing breaks
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != worker:
        os._exit(1)  # the worker died before the prctl: no orphan


def reap_children(timeout: float = 10.0) -> None:
    """Wait for the engine processes vLLM just stopped (it kills them but
    does not always wait, which leaves zombies behind)."""
    deadline = time.monotonic() + timeout
    for child in multiprocessing.active_children():
        child.join(max(0.0, deadline - time.monotonic()))


_SHM_DIR = "/dev/shm"

# After its own grace period, a stopping core SIGTERMs its VLLM::Worker and
# waits this long before SIGKILL (multiproc_executor._ensure_worker_termination).
_EXECUTOR_SIGTERM_WAIT_S = 4.0


def shutdown_timeout() -> float:
    """How long the engine core gets to stop before vLLM SIGKILLs it.

    AsyncLLM.shutdown() without a timeout allows 5 s, the same 5 s
    (VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS) the core itself may spend waiting
    for its VLLM::Worker: a worker that takes 3 s to exit (torch teardown on a
    busy CPU) leaves the core too little time and it is killed mid-teardown,
    leaking its /dev/shm ring buffer. We give the core its whole escalation
    (grace, SIGTERM wait) plus slack; a clean stop still takes what it takes."""
    return float(envs.VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS) + _EXECUTOR_SIGTERM_WAIT_S + 3.0


def shm_segments() -> set[str]:
    """Python/vLLM shared-memory segments (`psm_*`) present now."""
    try:
        return {n for n in os.listdir(_SHM_DIR) if n.startswith("psm_")}
    except OSError:
        return set()


def _mapped_segments() -> set[str]:
    """Segments some live process still maps (never removed)."""
    mapped: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    at = line.find(_SHM_DIR + "/psm_")
                    if at >= 0:
                        mapped.add(line[at + len(_SHM_DIR) + 1 :].split()[0])
        except OSError:
            continue
    return mapped


def remove_leftover_segments(before: set[str]) -> None:
    """Unlink the segments our engine created and left behind.

    vLLM force-kills an engine core that does not stop within its timeout;
    the core's shared-memory ring buffer then stays in /dev/shm until the
    worker exits. Only segments that appeared while this engine ran and that
    no process maps any more are removed (and dropped from Python's resource
    tracker, which would otherwise warn about them at exit).
    """
    from multiprocessing import resource_tracker

    leftovers = shm_segments() - before
    if not leftovers:
        return
    leftovers -= _mapped_segments()
    for name in sorted(leftovers):
        try:
            os.unlink(os.path.join(_SHM_DIR, name))
        except OSError:
            continue
        try:
            resource_tracker.unregister("/" + name, "shared_memory")
        except Exception:  # the tracker may not know it; nothing to undo
            log.debug("resource tracker did not know %s", name)
    if leftovers:
        log.info(
            "removed %d shared-memory segment(s) the stopped engine left behind", len(leftovers)
        )
