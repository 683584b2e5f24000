"""Shared fixtures: the tiny local model, real worker processes over gRPC, and the
pool that lets tests share them.

Worker processes and engines are what the suite's time goes to (a worker imports
vLLM, ~6 s of CPU; an engine start spawns and imports vLLM twice more, ~14 s of
CPU here), so tests share them wherever starting, replacing, stopping or killing
one is not what the test is about.

**Sharing a worker: the `workers` fixture.** Ask for the state you need; the pool
hands out a worker in exactly that state, starting or loading only what differs:

    @pytest.fixture
    def loaded(workers, tiny_model_dir):
        with workers.use(load=tiny_load_options(tiny_model_dir, *CHAT_OPTIONS)) as w:
            yield w

    with workers.use() as w: ...                      # no model loaded
    with workers.use(load=opts, env={"BACKEND_TRANSPORT": "grpcio"}) as w: ...

- A worker's *configuration* is its environment and arguments (`env`, `args`; every
  pooled worker runs with `--debug-requests`, which only adds log lines and which
  tests/engine_control.py needs). Workers of one configuration are reused; the pool
  keeps at most `POOL_SIZE` processes alive. When it needs room it stops the idle
  worker cheapest to lose: one with no engine (a process is ~8 s of CPU to start
  again, a loaded engine ~16 s more), then one not of the default configuration,
  then the least recently used; and it starts a process rather than unload an
  engine when the worker it would stop for it has none.
- `load=None` (the default) is a worker with no model loaded (Status UNINITIALIZED,
  or ERROR when its last LoadModel failed; `pristine=True` insists on
  UNINITIALIZED). `load=ModelOptions` is a worker whose engine was started with
  exactly those options, is alive, not stopped, and running no request.
- The state is checked at every hand-out, never assumed: the options of the last
  LoadModel that succeeded through the worker's own channel, the engine core's pid
  at that load (a LoadModel through another channel changes it), Status, and the
  core's process state. So a test cannot pass because an earlier one left the
  worker in a convenient state: it gets the state it asked for, or a fresh one.
- A test may change the worker it got (Free it, load other options): the pool sees
  the change and the next user gets what it asks for. A test that kills the worker
  or leaves its engine core stopped should not use the pool: start a `Worker` of
  its own (tests of shutdown, signals, engine death with --exit-on-engine-death).
- Use the narrowest scope that holds the state the test needs: function scope for
  "a worker with this model", module scope only when the module's tests share a
  state they built (test_engine_death's dead engine). A lease holds the worker for
  the fixture's scope: it is neither stopped nor handed to another state meanwhile.

**Two test processes.** `make test` runs two pytest processes side by side
(pytest-xdist `-n 2 --dist loadfile`: a module stays in one process, each process
has its own pool), because an engine start is one core's work and this machine has
two. A module whose verdicts include wall-clock bounds is listed in `ALONE`: its
tests' calls run with the other process waiting (their fixtures do not).
`PYTEST_SHUFFLE_SEED=N` runs modules and tests in a seeded random order (the
isolation check); `POOL_DEBUG=1` says why a test waited.

`make test` prints, after the slowest tests, the engine starts and the wall time of
each module (`engine starts per module`): keep an eye on what a new test costs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Worker processes the pool keeps alive at once (a loaded tiny-model worker is
# ~1.5 GiB of private memory: worker ~0.4, engine core ~0.4, model runner ~0.7;
# two test processes with four each stay well inside this machine's 24 GiB).
POOL_SIZE = 4
POOL_ARGS = ("--debug-requests",)
DEFAULT_CONFIG: tuple = ((), POOL_ARGS)  # a pooled worker's key: (env items, args)


@contextlib.contextmanager
def build_lock(name: str) -> Iterator[None]:
    """An exclusive lock across the processes of one run (pytest-xdist workers) for
    building a cached artefact once (the tiny model, the real models)."""
    lock_dir = ROOT / ".cache"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tiny_model_path() -> Path:
    """The tiny model's directory, built once across the run's test processes by
    build_tiny_model's own lock. (A build_lock("tiny-model") around it took the
    same lock file a second time in the same process: flock locks belong to the
    open file, so the build waited for itself and a fresh clone's suite hung.)"""
    from tools.tiny_model import build_tiny_model, default_model_dir

    return build_tiny_model(default_model_dir())


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return tiny_model_path()


def free_port() -> int:
    """A loopback port nothing is bound to, for a server started next.

    Not one from bind(0): that is an ephemeral port, free only until a client
    connection takes it as its local port, and a worker binds its port ~20 s
    later (after importing vLLM). With test_inbound's thousands of connections
    running in a suite beside this one, a worker failed with EADDRINUSE. A
    port below the kernel's ephemeral range is never handed to a client.

    Under pytest-xdist each test process draws from its own slice of that
    range, so two processes cannot pick the same port in the ~20 s before the
    worker binds it (a bind check cannot see a port picked but not yet bound)."""
    low = _ephemeral_low()
    if low <= 21_000:
        return _bind_check(0) or 0  # not Linux: bind(0)
    start, stop = _port_slice(20_000, low)
    for _ in range(1000):
        port = _bind_check(random.randrange(start, stop))
        if port:
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def _bind_check(port: int) -> int | None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return None
        return int(s.getsockname()[1])


def _port_slice(low: int, high: int) -> tuple[int, int]:
    """This test process's share of [low, high): all of it without xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or count <= 1:
        return low, high
    index, width = int(worker[2:]), (high - low) // count
    return low + index * width, low + (index + 1) * width


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # not Linux: bind(0)


# How a grpc channel waits before reconnecting to a worker that is not listening
# yet: grpc's default backoff grows to ~10 s over a worker's ~15 s start, so the
# first Health after the worker listens came 4-5 s late (measured over 3 starts).
_PROBE_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 200),
]

_UNKNOWN = object()  # what a worker has loaded after a failed or cancelled LoadModel


def _load_key(options: Any) -> bytes:
    return bytes(options.SerializeToString(deterministic=True))


class _LoadTracker(grpc.UnaryUnaryClientInterceptor):
    """Client interceptor on a worker's channel: remembers the options of the
    last LoadModel that succeeded through it (None after Free)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        method = details.method.rsplit("/", 1)[-1]
        if method not in ("LoadModel", "Free"):
            return continuation(details, request)
        w = self.worker
        before, w.loaded = w.loaded, _UNKNOWN  # while it runs, and if it fails
        outcome = continuation(details, request)
        try:
            ok = bool(outcome.result().success)
        except grpc.RpcError:  # refused, or cancelled (a load may still be running)
            ok = False
        core = w.engine_core_pid()
        if ok:
            w.loaded = _load_key(request) if method == "LoadModel" else None
        elif core is not None and core == w.core_pid:
            w.loaded = before  # rejected before the engine: the model is still in place
        elif core is None:
            w.loaded = None  # the old model was released and no new one is up
        w.core_pid = core
        return outcome


class Worker:
    """`python -m backend` in its own process, driven over a real gRPC channel."""

    # Metadata the readiness probe sends (a worker with an auth token needs it).
    health_metadata: tuple[tuple[str, str], ...] = ()

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
        # What was loaded through this channel (see _LoadTracker), and the engine
        # core that load started: the pool's record of the worker's state.
        self.loaded: object = None
        self.core_pid: int | None = None
        self.channel = grpc.intercept_channel(grpc.insecure_channel(self.addr), _LoadTracker(self))
        self.stub = backend_pb2_grpc.BackendStub(self.channel)
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 240.0) -> None:
        """Poll Health on a channel of its own that retries connecting every
        0.1-0.2 s; the worker's channel has not tried to connect yet, so its
        first call connects at once."""
        import grpc

        from backend.gen import backend_pb2 as pb
        from backend.gen import backend_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.addr, options=_PROBE_OPTIONS) as probe:
            stub = backend_pb2_grpc.BackendStub(probe)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"worker exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                try:
                    reply = stub.Health(
                        pb.HealthMessage(), metadata=self.health_metadata, timeout=2
                    )
                    if reply.message == b"OK":
                        return
                except grpc.RpcError:
                    time.sleep(0.05)
        raise TimeoutError(f"worker not healthy in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def log_text(self) -> str:
        """The whole log since the process started."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def engine_core_pid(self) -> int | None:
        from tests.engine_control import ENGINE_CORE, engine_processes

        cores = [p.pid for p in engine_processes(self.proc.pid) if p.name().startswith(ENGINE_CORE)]
        return cores[0] if len(cores) == 1 else None

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


# Workers being stopped in the background: the session waits for them at its end.
_RETIRING: list[threading.Thread] = []


def kill_group(pid: int) -> None:
    """Cleanup: SIGKILL the process group we created for a worker (its pid)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, 9)


def stop_worker(worker: Worker) -> None:
    """Worker.stop(), then SIGKILL whatever is left in its process group."""
    try:
        worker.stop()
    finally:
        kill_group(worker.proc.pid)


def retire(worker: Worker) -> None:
    """`stop_worker` in the background: for a fixture's teardown, where nothing
    is checked after the stop. A stop takes seconds (vLLM's engine processes
    exit one after the other, ~5 s here) that the next test need not wait for.
    Under pytest-xdist the stop holds the run's lock shared, as a test does, so
    it never runs during an ALONE test's call."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")

    def stop() -> None:
        lock = _run_lock(run, exclusive=False, keep_others_out=False) if run else None
        with lock or contextlib.nullcontext():
            stop_worker(worker)

    t = threading.Thread(target=stop, daemon=True)
    t.start()
    _RETIRING.append(t)


def pytest_sessionfinish(session: pytest.Session) -> None:
    for t in _RETIRING:  # a stop may wait for the other process's ALONE tests
        t.join(600)


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


class Workers:
    """The session's pool of worker processes (see the module docstring)."""

    def __init__(self, size: int = POOL_SIZE) -> None:
        self.size = size
        self._live: list[tuple[tuple, Worker]] = []  # least recently used first
        self._leases: dict[int, object] = {}  # id(worker) → the state it is held in

    @contextlib.contextmanager
    def use(
        self,
        load: Any = None,
        *,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        pristine: bool = False,
    ) -> Iterator[Worker]:
        """A worker of this configuration in this state, held until the block ends."""
        key = (tuple(sorted((env or {}).items())), (*POOL_ARGS, *args))
        want = None if load is None else _load_key(load)
        worker = self._acquire(key, want, load, pristine)
        # The pool's own promise, checked the way a hand-out is: every test
        # starts from the state it asked for, whatever ran before it.
        assert self._in_state(worker, want, pristine), f"pool handed out {worker.log_tail()}"
        self._leases[id(worker)] = want
        try:
            yield worker
        finally:
            self._leases.pop(id(worker), None)
        # A worker that died while a test held it must not be replaced silently.
        if worker.proc.poll() is not None:
            self._live = [(k, w) for k, w in self._live if w is not worker]
            worker.stop()
            raise AssertionError(
                f"the pooled worker exited ({worker.proc.returncode}) while a test held it "
                f"(a test that stops or kills its worker must start its own):\n{worker.log_tail()}"
            )

    def _acquire(self, key: tuple, want: bytes | None, load: Any, pristine: bool) -> Worker:
        mine = [w for k, w in self._live if k == key and w.proc.poll() is None]
        free = [w for w in mine if id(w) not in self._leases or self._leases[id(w)] == want]
        for w in free:
            if self._in_state(w, want, pristine):
                return self._touch(key, w)
        # Not as wanted: a worker of this configuration that holds no other
        # state (none loaded, or leased for nothing), else a new process.
        spare = [w for w in free if id(w) not in self._leases]
        if want is not None and spare:
            # Replace another loaded engine only when no process is free for
            # one more: that engine may be the next test's.
            unloaded = [w for w in spare if w.loaded is None or w.loaded is _UNKNOWN]
            w = (unloaded or ([] if self._room() else spare) or [None])[0]
            if w is not None and self._settle(w):
                self._load(w, load)
                return self._touch(key, w)
        if want is None and not pristine:
            # Free a loaded engine only when no process is free for one more.
            loaded = [w for w in spare if isinstance(w.loaded, bytes)]
            unloaded = [w for w in spare if w.loaded is None or w.loaded is _UNKNOWN]
            for w in unloaded + ([] if self._room() else loaded):
                freed = self._settle(w) and w.stub.Free(_pb().HealthMessage(), timeout=300).success
                if freed and self._in_state(w, None, pristine):
                    return self._touch(key, w)
        w = self._start(key)
        if want is not None:
            self._load(w, load)
        return w

    def _in_state(self, w: Worker, want: bytes | None, pristine: bool) -> bool:
        ok = self._in_state_(w, want, pristine)
        if os.environ.get("POOL_DEBUG"):  # why a test waited for a load
            print(f"\npool: {w.addr} in the state wanted: {ok}", file=sys.stderr)
        return ok

    def _in_state_(self, w: Worker, want: bytes | None, pristine: bool) -> bool:
        from tests.engine_control import engine_processes

        pb = _pb()
        if w.proc.poll() is not None or w.loaded is _UNKNOWN:
            return False
        state = w.stub.Status(pb.HealthMessage(), timeout=30).state
        if want is None:
            ok = (pb.StatusResponse.UNINITIALIZED,) + (
                () if pristine else (pb.StatusResponse.ERROR,)
            )
            return w.loaded is None and state in ok and not engine_processes(w.proc.pid)
        if w.loaded != want or w.core_pid is None or w.engine_core_pid() != w.core_pid:
            return False
        if not self._settle(w):
            return False
        return w.stub.Status(pb.HealthMessage(), timeout=30).state == pb.StatusResponse.READY

    @staticmethod
    def _settle(w: Worker, timeout: float = 30.0) -> bool:
        """Wait for the worker to run no request and its engine core to run
        (not SIGSTOPped); False if it does not get there."""
        import psutil

        pb = _pb()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                if w.core_pid and psutil.Process(w.core_pid).status() == psutil.STATUS_STOPPED:
                    return False
            if w.stub.Status(pb.HealthMessage(), timeout=30).state != pb.StatusResponse.BUSY:
                return True
            time.sleep(0.1)
        return False

    @staticmethod
    def _load(w: Worker, load: Any) -> None:
        result = w.stub.LoadModel(load, timeout=900)
        assert result.success, f"{result.message}\n{w.log_tail()}"

    def _start(self, key: tuple) -> Worker:
        env, args = key
        while len(self._live) >= self.size and (victim := self._victim()):
            self._retire(*victim)
        w = Worker(env=dict(env), args=list(args))
        self._live.append((key, w))
        return w

    def _victim(self) -> tuple[tuple, Worker] | None:
        """The idle worker cheapest to lose: exited, then no engine, then not of the
        default configuration, then the least recently used."""
        idle = [(i, k, w) for i, (k, w) in enumerate(self._live) if id(w) not in self._leases]
        if not idle:
            return None
        _, key, w = min(
            idle,
            key=lambda t: (
                t[2].proc.poll() is None,
                isinstance(t[2].loaded, bytes),
                t[1] == DEFAULT_CONFIG,
                t[0],
            ),
        )
        return key, w

    def _room(self) -> bool:
        """Room for one more process: below the size, or the worker that would be
        stopped for it has no engine (cheaper to start again than an engine)."""
        if len(self._live) < self.size:
            return True
        victim = self._victim()
        return victim is not None and not isinstance(victim[1].loaded, bytes)

    def _touch(self, key: tuple, w: Worker) -> Worker:
        self._live = [(k, x) for k, x in self._live if x is not w] + [(key, w)]
        return w

    def _retire(self, key: tuple, w: Worker) -> None:
        self._live.remove((key, w))
        retire(w)

    def close(self) -> None:
        for key, w in list(self._live):
            self._retire(key, w)


def _pb() -> Any:
    from backend.gen import backend_pb2

    return backend_pb2


@pytest.fixture(scope="session")
def workers() -> Iterator[Workers]:
    pool = Workers()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def worker(workers: Workers) -> Iterator[Worker]:
    """A pooled worker with no model loaded."""
    with workers.use() as w:
        yield w


# Parsers the chat tests rely on; the tiny model's tokenizer has their markers.
# Grammars must also hold inside the reasoning, since the tests force whole
# answers (`<think>…</think><tool_call>…`) on a model with random weights.
CHAT_OPTIONS = (
    "tool_parser:hermes",
    "reasoning_parser:qwen3",
    '--structured-outputs-config:{"enable_in_reasoning": true}',
)


@pytest.fixture
def loaded(workers: Workers, tiny_model_dir: Path) -> Iterator[Worker]:
    """A pooled worker with the tiny model loaded with CHAT_OPTIONS."""
    with workers.use(load=tiny_load_options(tiny_model_dir, *CHAT_OPTIONS)) as w:
        yield w


@pytest.fixture
def tiny_loaded(workers: Workers, tiny_model_dir: Path) -> Iterator[Worker]:
    """A pooled worker with the tiny model loaded with the default options."""
    with workers.use(load=tiny_load_options(tiny_model_dir)) as w:
        yield w


pytest_plugins = ["tests.suite_timing"]


# ---- running beside another test process (pytest-xdist) -------------------------------

# Modules whose verdicts include wall-clock latency bounds (test_inbound: probe
# p50 <= 100 ms, Health within 2 s during an attack): under pytest-xdist their
# tests' calls run alone, the other test process waiting, so the machine is as
# quiet as the suite can make it (their fixtures' setup and teardown do not).
# Everything else runs beside the other process (its verdicts hold
# with the other core busy: issue 16).
ALONE = ("tests/reliability/test_inbound.py",)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        yield
        return
    if _module_of(item) in ALONE:
        # Only the test's call runs alone (pytest_runtest_call below): its
        # fixtures (starting the workers it attacks) run beside the other
        # process, which would otherwise wait ~10 s per worker start.
        item.stash[_NEXT_ALONE] = nextitem is not None and _module_of(nextitem) in ALONE
        yield
        return
    with _run_lock(run, exclusive=False, keep_others_out=False):
        yield


_NEXT_ALONE = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):  # type: ignore[no-untyped-def]
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run or _module_of(item) not in ALONE:
        yield
        return
    with _run_lock(run, exclusive=True, keep_others_out=item.stash[_NEXT_ALONE]):
        yield


def _module_of(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


@contextlib.contextmanager
def _run_lock(run: str, *, exclusive: bool, keep_others_out: bool) -> Iterator[None]:
    """A readers-writer lock over the test processes of one run: every test holds
    it shared, an ALONE test exclusively. An exclusive test raises a flag that
    keeps new shared holders out while it waits and, when the next test is ALONE
    too, until that one runs (so the other process cannot slip in between)."""
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"pytest-{run}"
    flag = base.with_suffix(".alone")
    with open(base.with_suffix(".lock"), "a") as f:
        if exclusive:
            flag.touch()
            fcntl.flock(f, fcntl.LOCK_EX)
        else:
            while flag.exists():
                time.sleep(0.2)
            fcntl.flock(f, fcntl.LOCK_SH)
        try:
            yield
        finally:
            if exclusive and not keep_others_out:
                flag.unlink(missing_ok=True)
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- isolation check: a seeded shuffle ------------------------------------------------


@pytest.hookimpl(tryfirst=True)  # before -m deselects by mark
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A module's `LONG_CELLS` (test id → reason) marks single parametrized
    cells `long` (make test-all only).

    PYTEST_SHUFFLE_SEED=N: run the modules in a random order and each module's
    tests in a random order, to show no test passes only because an earlier one
    left a pooled worker in a convenient state. A test whose docstring says it
    "Runs last" / "Runs after" (it consumes its module's shared state by design:
    test_engine_death's reload, test_hostile_input's after-the-table check)
    stays at its module's end."""
    for item in items:
        if item.name in getattr(getattr(item, "module", None), "LONG_CELLS", {}):
            item.add_marker(pytest.mark.long)
    seed = os.environ.get("PYTEST_SHUFFLE_SEED")
    if not seed:
        return
    rng = random.Random(int(seed))
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(_module_of(item), []).append(item)
    order = list(modules)
    rng.shuffle(order)
    items[:] = []
    for name in order:
        tests = modules[name]
        rng.shuffle(tests)
        last = [t for t in tests if _runs_last(t)]
        items.extend([t for t in tests if not _runs_last(t)] + last)
    config.pluginmanager.get_plugin("terminalreporter").write_line(  # type: ignore[union-attr]
        f"shuffled with seed {seed}: modules {[m.rsplit('/', 1)[-1] for m in order]}"
    )


def _runs_last(item: pytest.Item) -> bool:
    doc = (getattr(item, "function", None) and item.function.__doc__) or ""  # type: ignore[attr-defined]
    return doc.lstrip().startswith(("Runs last", "Runs after"))
