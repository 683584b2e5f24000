"""What a stopped engine leaves behind: its child processes and shared memory.

vLLM stops its engine processes but does not always wait for them, and a core
killed mid-teardown leaves its /dev/shm ring buffer behind. These functions reap
and clean up after `Engine.shutdown`, and give the core its whole stop time.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time

from vllm import envs

log = logging.getLogger(__name__)


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
