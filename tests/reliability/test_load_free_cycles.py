"""Load → Free, again and again, in one worker process: nothing may accumulate.

A gateway swaps models on one worker for hours; a few MiB or one leaked
process per cycle adds up. After every Free: no engine process, no leaked
POSIX shared memory, and the worker's own RSS back where it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import pytest

from backend.gen import backend_pb2 as pb
from tests.engine_control import engine_processes
from tests.reliability.helpers import (
    describe,
    greedy,
    load,
    rpc_code,
    shm_names,
    shm_used_by,
    survivors,
    tree_pids,
    tree_rss,
    zombies,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

CYCLES = 3
MiB = 2**20


@dataclass
class Cycle:
    index: int
    load_s: float
    free_s: float
    loaded_tree_rss: int
    loaded_status_total: int
    engine: list[str]
    left_after_free: list[str]
    zombies_after_free: list[str]
    shm_used: set[str]
    shm_leaked: set[str]
    worker_rss_after_free: int
    status_total_after_free: int
    predict_after_free: grpc.StatusCode | None


@dataclass
class Run:
    cycles: list[Cycle]
    log: str  # the worker's log over all the cycles (from the first load on)


@pytest.fixture(scope="module")
def run(workers, tiny_model_dir):
    """The cycles, on a pooled worker with no model loaded (left unloaded)."""
    with workers.use() as worker:
        since = worker.log_path.stat().st_size  # where this module's part of the log starts
        out: list[Cycle] = []
        for i in range(CYCLES):
            started = time.monotonic()
            load(worker, tiny_model_dir)
            load_s = time.monotonic() - started
            assert worker.stub.Predict(greedy(Tokens=8), timeout=120).tokens == 8
            list(worker.stub.PredictStream(greedy(Tokens=8), timeout=120))
            engine = engine_processes(worker.proc.pid)
            shm_used = shm_used_by(tree_pids(worker.proc.pid))
            loaded_rss = tree_rss(worker.proc.pid)["tree"]
            loaded_status = worker.stub.Status(pb.HealthMessage(), timeout=10).memory.total

            started = time.monotonic()
            assert worker.stub.Free(pb.HealthMessage(), timeout=120).success
            free_s = time.monotonic() - started
            left = survivors(engine, timeout=15)
            time.sleep(1.0)  # unlinking is done by the exiting processes themselves
            cycle = Cycle(
                index=i,
                load_s=load_s,
                free_s=free_s,
                loaded_tree_rss=loaded_rss,
                loaded_status_total=loaded_status,
                engine=describe(engine),
                left_after_free=describe(left),
                zombies_after_free=describe(zombies(worker.proc.pid)),
                shm_used=shm_used,
                shm_leaked=shm_used & shm_names(),
                worker_rss_after_free=tree_rss(worker.proc.pid)["worker"],
                status_total_after_free=worker.stub.Status(
                    pb.HealthMessage(), timeout=10
                ).memory.total,
                predict_after_free=rpc_code(
                    lambda: worker.stub.Predict(greedy(Tokens=2), timeout=10)
                )[0],
            )
            out.append(cycle)
            print(
                f"\ncycle {i}: load {load_s:.1f}s, free {free_s:.1f}s, loaded tree RSS "
                f"{loaded_rss / MiB:.0f} MiB, worker RSS after Free "
                f"{cycle.worker_rss_after_free / MiB:.1f} MiB, Status total after Free "
                f"{cycle.status_total_after_free / MiB:.1f} MiB, engine {cycle.engine}, "
                f"left {cycle.left_after_free}, zombies {cycle.zombies_after_free}, "
                f"shm used {sorted(shm_used)}, still present {sorted(cycle.shm_leaked)}"
            )
        yield Run(out, worker.log_path.read_bytes()[since:].decode(errors="replace"))


@pytest.fixture(scope="module")
def cycles(run: Run) -> list[Cycle]:
    return run.cycles


def _table(cycles: list[Cycle]) -> str:
    return "\n".join(
        f"cycle {c.index}: worker RSS after Free {c.worker_rss_after_free / MiB:.1f} MiB, "
        f"loaded tree {c.loaded_tree_rss / MiB:.0f} MiB, free {c.free_s:.1f}s, "
        f"left {c.left_after_free}, shm leaked {sorted(c.shm_leaked)}"
        for c in cycles
    )


def test_every_cycle_ran(cycles):
    assert len(cycles) == CYCLES
    assert all(c.engine for c in cycles), "each load starts engine processes"


def test_no_engine_process_remains_after_free(cycles):
    assert not any(c.left_after_free for c in cycles), _table(cycles)


def test_free_reaps_the_engine_processes(cycles):
    # vLLM kills its engine core without always waiting for it; Free joins
    # the exited children, so no zombie is left between Free and the next load.
    assert not any(c.zombies_after_free for c in cycles), _table(cycles)


def test_worker_rss_after_free_stays_within_10_percent_of_the_first_cycle(cycles):
    first = cycles[0].worker_rss_after_free
    table = _table(cycles)
    print("\n" + table)
    for c in cycles[1:]:
        assert c.worker_rss_after_free <= first * 1.10, table
    # Status's own view agrees: after Free only the worker (and the resource
    # tracker) remain, far below the loaded footprint.
    for c in cycles:
        assert c.status_total_after_free < c.loaded_status_total, table


def test_requests_after_free_fail_with_failed_precondition(cycles):
    codes = [c.predict_after_free for c in cycles]
    assert codes == [grpc.StatusCode.FAILED_PRECONDITION] * CYCLES, codes


def test_free_returns_promptly(cycles):
    # vLLM gives its worker process 5 s to exit before killing it.
    assert all(c.free_s < 30 for c in cycles), _table(cycles)


FORCE_KILL = "force killing remaining process EngineCore"


def test_free_stops_the_engine_core_without_killing_it(run):
    # vLLM's default 5 s before SIGKILL equals the core's own wait for its
    # VLLM::Worker, so a slow worker exit used to get the core killed
    # mid-teardown (engine_processes.shutdown_timeout gives it its whole escalation).
    kills = run.log.count(FORCE_KILL)
    assert kills == 0, f"{kills} forced kills of the engine core in {CYCLES} Free calls"


def test_no_shared_memory_segment_survives_free(cycles):
    assert all(c.shm_used for c in cycles), "the engine uses /dev/shm ring buffers"
    assert not any(c.shm_leaked for c in cycles), _table(cycles)
