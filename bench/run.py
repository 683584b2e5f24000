"""The orchestrator: start each target's engine once, run the workloads interleaved, report.

Never imports vLLM itself (it only waits on its children), so it costs no CPU
while a workload runs: every measured process is one of its children, each in
its own session, and each is stopped by its own pid at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import psutil

from backend.config import TRANSPORTS
from bench import common, gcprobe, perfsplit, report, vllm_grpc
from bench.common import (
    ROOT,
    Channel,
    Workload,
    model_options,
    quiet_child_env,
    workloads,
)
from bench.profile import format_profile, parse_collapsed

RESULTS_DIR = ROOT / "bench" / "results"
LOG_ROOT = ROOT / ".cache" / "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _task_cpu(pid: int) -> float | None:
    """On-CPU seconds of all live threads of `pid`, in ns precision (/proc/PID/task/*/schedstat).

    psutil's cpu_times come from /proc/PID/stat in 10 ms clock ticks: too coarse for
    per-token CPU of a 1-second run. Threads that exit during a run are lost here,
    but the measured processes keep their threads (pools, engine loops).
    """
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def thread_cpu(pid: int) -> dict[str, float]:
    """On-CPU seconds per thread of `pid`, keyed "comm:tid" (/proc/PID/task/*/schedstat)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = "MainThread" if tid == str(pid) else f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[f"{comm}:{tid}"] = int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return out


def thread_cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per thread name (tids folded), seconds used between two `thread_cpu` snapshots."""
    out: dict[str, float] = {}
    for key, value in after.items():
        used = value - before.get(key, 0.0)
        if used > 0:
            name = key.rsplit(":", 1)[0]
            out[name] = round(out.get(name, 0.0) + used, 6)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def cpu_seconds(pid: int, tree: bool) -> float:
    """CPU seconds of a process (all its threads), plus all its descendants if `tree`."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *(proc.children(recursive=True) if tree else ())]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        precise = _task_cpu(p.pid)
        if precise is not None:
            total += precise
            continue
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            total += t.user + t.system
    return total


# Each measured server and its client share one session by default (so one
# scheduler autogroup, like A's driver and its engine, and like a gateway that
# spawns the worker without setsid). `--separate-sessions` gives each process its
# own session: with kernel.sched_autogroup_enabled=1 the client then competes as
# a separate group with the engine's busy-polling (sched_yield only yields within
# a group), which delays the client's reads by whole time slices under load.
SEPARATE_SESSIONS = False
# Niceness of the client processes of B, Bg and C (not A's driver: it is A's
# front end). A control experiment: on 2 cores the client competes with the
# engine core for CPU; a niced client yields to it (--client-nice).
CLIENT_NICE = 0


def _wait_until(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, timeout: float = 600.0
) -> None:
    """Poll `ready` every 0.5 s until it holds; the server exiting first or
    `timeout` passing is an error naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if ready():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready in time")


def _stop_process(proc: subprocess.Popen[bytes], name: str, grace: float = 40.0) -> None:
    """SIGTERM our child (it stops its engine), then SIGKILL what is left of its tree, by pid."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"  {name}: no exit after SIGTERM, killing it", file=sys.stderr)
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    for child in tree:  # engine processes it did not stop (psutil checks pid reuse)
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            child.kill()


class Child:
    """A bench driver/client process (`python -m bench.X --fd N ...`) and its channel."""

    def __init__(
        self,
        name: str,
        module: str,
        args: list[str],
        log: IO[bytes],
        program: list[str] | None = None,
        nice: int = 0,
        env: dict[str, str] | None = None,
    ) -> None:
        """`python -m module --fd N args`, or `program --fd N args` when given.

        `nice` is applied before exec, so every thread of the child inherits it
        (Linux keeps niceness per thread)."""
        parent, child = socket.socketpair()
        self.name = name
        self.proc = subprocess.Popen(
            [*(program or [sys.executable, "-m", module]), "--fd", str(child.fileno()), *args],
            cwd=ROOT,
            env=env or quiet_child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=[child.fileno()],
            start_new_session=SEPARATE_SESSIONS,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
        child.close()
        self.chan = Channel(parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, cmd: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
        self.chan.send(cmd)
        try:
            reply = self.chan.recv(timeout)
        except (EOFError, TimeoutError, OSError) as e:
            raise RuntimeError(f"{self.name}: no answer to {cmd.get('op')!r}: {e}") from None
        if reply.get("op") == "error":
            raise RuntimeError(f"{self.name}: {cmd.get('op')} failed: {reply['error']}")
        return reply

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.call({"op": "quit"}, timeout=60)
        with contextlib.suppress(Exception):
            self.chan.close()
        _stop_process(self.proc, self.name)


class Target:
    """One thing measured: a serving process tree, driven by a client (maybe itself)."""

    key = ""
    kinds: tuple[str, ...] = ("raw",)

    def __init__(self) -> None:
        self.client: Child | None = None
        self.load_seconds: float | None = None
        self.load_info: dict[str, Any] = {}

    @property
    def serving_pid(self) -> int:
        raise NotImplementedError

    @property
    def client_is_server(self) -> bool:
        return False

    def supports(self, w: Workload) -> bool:
        return w.kind in self.kinds

    def gc_snapshot(self) -> dict[str, Any] | None:
        return None

    def run(self, w: Workload) -> dict[str, Any]:
        assert self.client is not None
        gc0 = self.gc_snapshot()
        pid = self.serving_pid
        threads0 = thread_cpu(pid)
        tree0, main0 = cpu_seconds(pid, True), cpu_seconds(pid, False)
        client0 = None if self.client_is_server else cpu_seconds(self.client.pid, False)
        load1 = os.getloadavg()[0]
        self.client.call({"op": "run", "workload": w.to_json()}, timeout=1800)
        tree1, main1 = cpu_seconds(pid, True), cpu_seconds(pid, False)
        threads1 = thread_cpu(pid)
        client1 = None if self.client_is_server else cpu_seconds(self.client.pid, False)
        gc1 = self.gc_snapshot()
        raw = self.client.call({"op": "results"})
        if gc0 is not None and gc1 is not None:
            raw["gc"] = gcprobe.delta(gc0, gc1)
        raw["main_threads_cpu_s"] = thread_cpu_delta(threads0, threads1)
        raw["tree_cpu_s"] = tree1 - tree0
        raw["main_cpu_s"] = main1 - main0
        raw["client_cpu_s"] = None if client0 is None or client1 is None else client1 - client0
        raw["loadavg_1m"] = load1
        return raw

    def stop(self) -> None:
        raise NotImplementedError


class ProcessTarget(Target):
    """A target served by a process of its own (`self.proc`), stopped with its client."""

    proc: subprocess.Popen[bytes]

    @property
    def process_name(self) -> str:
        raise NotImplementedError

    @property
    def serving_pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop()
        _stop_process(self.proc, self.process_name)


class InProcTarget(Target):
    key = "A"

    def __init__(self, log: IO[bytes], gc_probe: bool) -> None:
        super().__init__()
        self.gc_probe = gc_probe
        self.client = Child("A driver", "bench.inproc", [], log)

    def gc_snapshot(self) -> dict[str, Any] | None:
        if not self.gc_probe or self.client is None:
            return None
        return self.client.call({"op": "gc"})

    @property
    def serving_pid(self) -> int:
        assert self.client is not None
        return self.client.pid

    @property
    def client_is_server(self) -> bool:
        return True

    def load(self, options: dict[str, Any]) -> None:
        assert self.client is not None
        reply = self.client.call(
            {"op": "load", "model_options": options, "gc_probe": self.gc_probe}
        )
        self.load_seconds = float(reply["seconds"])
        self.load_info = reply

    def stop(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.call({"op": "shutdown"}, timeout=120)
            self.client.stop()


class WorkerTarget(ProcessTarget):
    kinds: tuple[str, ...] = ("raw", "chat")

    def __init__(
        self,
        key: str,
        log: IO[bytes],
        client_log: IO[bytes],
        gc_probe: bool,
        transport: str | None = None,
        cut: str | None = None,
        tree: Path | None = None,
    ) -> None:
        """`transport`: this worker's gRPC server, when not the run's `--transport`;
        `cut`: a piece of the per-token path cut out (bench/cuts.py); `tree`: run
        the worker from another checkout (its `backend/`, e.g. a proposal applied)."""
        super().__init__()
        self.key = key
        if transport is not None or cut is not None or tree is not None:
            self.kinds = ("raw",)
        self.addr = f"127.0.0.1:{_free_port()}"
        self.gc_chan: Channel | None = None
        cmd = [sys.executable, "-m", "backend", "--addr", self.addr]
        pass_fds: list[int] = []
        if gc_probe:  # the same worker main, with a GC-pause probe around it
            parent, child = socket.socketpair()
            cmd = [sys.executable, "-m", "bench.gcprobe", "--fd", str(child.fileno()),
                   "--addr", self.addr]  # fmt: skip
            pass_fds = [child.fileno()]
            self.gc_chan = Channel(parent)
        elif cut is not None:
            cmd = [sys.executable, "-m", "bench.cuts", "--cut", cut, "--addr", self.addr]
        env = quiet_child_env()
        if transport is not None:
            env["BACKEND_TRANSPORT"] = transport
        if tree is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(tree), env["PYTHONPATH"]])
        self.proc = subprocess.Popen(
            cmd,
            cwd=tree or ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
            start_new_session=SEPARATE_SESSIONS,
        )
        if gc_probe:
            child.close()
        self._wait_healthy()
        self.client = Child(
            f"{key} client",
            "bench.grpc_client",
            ["--addr", self.addr],
            client_log,
            nice=CLIENT_NICE,
        )

    def _wait_healthy(self, timeout: float = 180.0) -> None:
        import grpc

        from backend.gen import backend_pb2 as pb
        from backend.gen import backend_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.addr) as channel:
            stub = backend_pb2_grpc.BackendStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker {self.key} exited with {self.proc.returncode}")
                try:
                    if stub.Health(pb.HealthMessage(), timeout=2).message == b"OK":
                        return
                except grpc.RpcError:
                    time.sleep(0.2)
        raise TimeoutError(f"worker {self.key} not healthy in {timeout}s")

    @property
    def process_name(self) -> str:
        return f"worker {self.key}"

    def gc_snapshot(self) -> dict[str, Any] | None:
        if self.gc_chan is None:
            return None
        self.gc_chan.sock.sendall(b"?\n")
        return self.gc_chan.recv(30)

    def load(self, options: dict[str, Any]) -> None:
        assert self.client is not None
        reply = self.client.call({"op": "load", "model_options": options})
        if not reply["ok"]:
            raise RuntimeError(f"LoadModel on {self.key} failed: {reply['message']}")
        self.load_seconds = float(reply["seconds"])
        # The worker reports its own AsyncLLM construction time ("loaded X in 12.3s"):
        # the rest of the RPC is LoadModel's own work (option parsing, renderer, ...).
        m = re.search(r" in ([0-9.]+)s", reply.get("message", ""))
        if m:
            reply["engine_seconds"] = float(m.group(1))
            reply["overhead_seconds"] = self.load_seconds - float(m.group(1))
        self.load_info = reply

    def stop(self) -> None:
        if self.gc_chan is not None:
            with contextlib.suppress(Exception):
                self.gc_chan.close()
        super().stop()


GO_CLIENT = LOG_ROOT / "goclient"


def build_go_client() -> Path | None:
    """bench/goclient (grpc-go, GOPATH mode against Debian's golang-google-grpc-dev:
    `apt-get install golang-go golang-google-grpc-dev`), or None without `go`."""
    go = shutil.which("go")
    if go is None:
        return None
    env = dict(os.environ, GO111MODULE="off", GOFLAGS="")
    env.setdefault("GOPATH", "/usr/share/gocode")
    env.setdefault("GOCACHE", str(LOG_ROOT.parent / "go-build"))
    done = subprocess.run(
        [go, "build", "-o", str(GO_CLIENT), "./bench/goclient"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        _say(f"Go client not built (target Bg skipped): {done.stderr.strip()[-500:]}")
        return None
    return GO_CLIENT


class GoClientTarget(Target):
    """Worker B again, driven by the Go client: the gateway's own language."""

    key = "Bg"

    def __init__(self, worker: WorkerTarget, program: Path, log: IO[bytes]) -> None:
        super().__init__()
        self.worker = worker
        self.client = Child(
            "Bg client", "", ["--addr", worker.addr], log, program=[str(program)], nice=CLIENT_NICE
        )

    @property
    def serving_pid(self) -> int:
        return self.worker.serving_pid

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop()


class OpenAITarget(ProcessTarget):
    key = "C"

    def __init__(self, model_dir: str, max_model_len: int, log: IO[bytes], client_log: IO[bytes]):
        super().__init__()
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model_dir,
            "--dtype", "float32",
            "--max-model-len", str(max_model_len),
            "--enforce-eager",
            "--kv-cache-memory-bytes", str(256 * 2**20),
            "--structured-outputs-config", '{"enable_in_reasoning": true}',
            "--host", "127.0.0.1", "--port", str(port),
        ]  # fmt: skip
        for option in common.EXTRA_OPTIONS:
            key, _, value = option.partition(":")
            cmd += [f"--{key.removeprefix('--').replace('_', '-')}", value]
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=quiet_child_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=SEPARATE_SESSIONS,
        )  # fmt: skip
        self._wait_healthy()
        # Process start to healthy (imports included): not comparable with A's number.
        self.load_seconds = time.perf_counter() - started
        self.client = Child(
            "C client",
            "bench.openai_client",
            ["--url", self.url, "--model", model_dir],
            client_log,
            nice=CLIENT_NICE,
        )

    def _wait_healthy(self) -> None:
        import httpx

        def healthy() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(self.url + "/health", timeout=2).status_code == 200
            return False

        _wait_until(self.proc, healthy, "vLLM's OpenAI server")

    process_name = "openai server"


class VllmGrpcTarget(ProcessTarget):
    """vLLM's own gRPC server (bench/vllm_grpc.py: smg's servicer, ids out, no detokenizing)."""

    key = "G"

    def __init__(self, model_dir: str, max_model_len: int, log: IO[bytes], client_log: IO[bytes]):
        super().__init__()
        port = _free_port()
        self.addr = f"127.0.0.1:{port}"
        cmd = vllm_grpc.server_command(
            model_dir, max_model_len, port, common.KV_CACHE_BYTES, common.EXTRA_OPTIONS
        )
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=vllm_grpc.env_with_smg(quiet_child_env()), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=SEPARATE_SESSIONS,
        )  # fmt: skip
        self._wait_serving()
        # Process start to SERVING (imports and the servicer's warm-up included).
        self.load_seconds = time.perf_counter() - started
        self.client = Child(
            "G client",
            "bench.vllm_grpc",
            ["--addr", self.addr],
            client_log,
            nice=CLIENT_NICE,
            env=vllm_grpc.env_with_smg(quiet_child_env()),
        )

    def _wait_serving(self) -> None:
        _wait_until(self.proc, lambda: vllm_grpc.serving(self.addr), "vLLM's gRPC server")

    process_name = "vllm grpc server"


# ---- the run ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Front-end overhead: our gRPC worker (B) vs vLLM AsyncLLM in-process (A).",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: fewer tokens and repeats")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 5; --quick: 2)")
    p.add_argument("--with-openai", action="store_true", help="also vLLM's OpenAI server (C)")
    p.add_argument(
        "--with-vllm-grpc",
        action="store_true",
        help="also vLLM's own gRPC server (G; needs smg-grpc-servicer, see bench/vllm_grpc.py)",
    )
    p.add_argument(
        "--worker-cut",
        action="append",
        default=[],
        choices=("nowrite", "discard", "nosend"),
        help="also a worker with a piece of the per-token path cut out (target B:NAME, "
        "bench/cuts.py); repeatable",
    )
    p.add_argument(
        "--worker-tree",
        type=Path,
        default=None,
        metavar="DIR",
        help="also the worker from another checkout (target B', raw workloads): "
        "A/B-test a change in one run, e.g. a copy of this tree with a proposal applied",
    )
    p.add_argument(
        "--with-grpcio",
        action="store_true",
        help="also the worker on the grpcio transport (Bi; with --transport h2), raw workloads",
    )
    p.add_argument(
        "--workloads",
        default="c1,c8,c32,long,chat8",
        help="comma-separated subset of c1,c8,c32,long,chat8 and c1short (2-token requests: "
        "per-request cost)",
    )
    p.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after the repeats, py-spy the worker's main process this long under load",
    )
    p.add_argument("--profile-workload", default="c8", help="workload run while profiling")
    p.add_argument(
        "--perf",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after the repeats, perf-record each raw target's serving process this long "
        "under --perf-workload, and count its system calls (bench/perfsplit.py)",
    )
    p.add_argument("--perf-workload", default="c1", help="workload run under --perf")
    p.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy --native (C/Cython frames, e.g. grpc's aio core)",
    )
    p.add_argument(
        "--profile-engine",
        action="store_true",
        help="profile the worker's engine processes too (py-spy --subprocesses)",
    )
    p.add_argument(
        "--gc-probe",
        action="store_true",
        help="time garbage-collector pauses in A's driver and the workers (bench/gcprobe.py)",
    )
    p.add_argument(
        "--separate-sessions",
        action="store_true",
        help="start every server and client in its own session (scheduler autogroup); "
        "default: all in the bench's session",
    )
    p.add_argument(
        "--client-nice",
        type=int,
        default=0,
        metavar="N",
        help="run the clients of B, Bg and C at niceness N (not A's driver): a control "
        "for how much the client's own CPU costs the engine on a small machine",
    )
    p.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop of every bench process and worker (default uvloop, as vLLM's "
        "server and our worker use; asyncio compares the stock loop)",
    )
    p.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="KEY:VALUE",
        help="extra engine option for every target, as in ModelOptions.Options "
        "(e.g. stream_interval:4); repeatable",
    )
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="h2",
        help="the workers' gRPC server (BACKEND_TRANSPORT): h2 (the worker's default) or grpcio",
    )
    p.add_argument(
        "--no-go",
        action="store_true",
        help="skip target Bg (worker B driven by the Go client in bench/goclient)",
    )
    p.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the gRPC floor measurement at the end (bench/floor.py, ~20 s)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model directory, or smollm2 (the real model, tools/real_models.py; "
        "use with --workloads c1,c8: chat8 forces the tiny model's tags); default: the tiny model",
    )
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory for <timestamp>.json")
    p.add_argument(
        "--idle-seconds", type=float, default=2.0, help="idle CPU check per target (0: skip)"
    )
    p.add_argument(
        "--settle",
        type=float,
        default=1.5,
        metavar="SECONDS",
        help="pause before each measured run: vLLM's engine busy-polls for 1 s after its "
        "last step, which would steal CPU from the next target",
    )
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    return args


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "backend"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() + ("+dirty-backend" if dirty.stdout.strip() else "")
    except OSError:
        return ""


def _quietly(fn: Any) -> None:
    with contextlib.suppress(Exception):
        fn()


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {msg}", flush=True)


def _warm(target: Target, ws: list[Workload]) -> None:
    kinds = {w.kind for w in ws if target.supports(w)}
    if "raw" in kinds:
        target.run(Workload("warmup", 4, 8, 32))
        target.run(Workload("warmup32", 32, 32, 16))
    if "chat" in kinds:
        chat = next(w for w in ws if w.kind == "chat")
        target.run(Workload("warmup-chat", 2, 4, chat.tokens, kind="chat"))


def _profile(
    target: WorkerTarget,
    w: Workload,
    seconds: float,
    log_dir: Path,
    native: bool,
    subprocesses: bool,
) -> dict[str, Any]:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy not found: venv/bin/pip install py-spy"}
    raw = log_dir / "worker-profile.txt"
    # Blocking mode (py-spy pauses the process per sample, ~1 % here): its idle
    # detection is reliable then. --native adds C/Cython frames (grpc's aio core).
    rate = 100
    cmd = [
        spy, "record", "--pid", str(target.serving_pid), "--duration", str(int(seconds)),
        "--rate", str(rate), "--threads", "--format", "raw", "-o", str(raw),
    ]  # fmt: skip
    if native:
        cmd.append("--native")
    if subprocesses:
        cmd.append("--subprocesses")
    with open(log_dir / "py-spy.log", "wb") as log:
        spy_proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(1.0)
        rounds, tokens, wall = 0, 0, 0.0
        while spy_proc.poll() is None:
            res = target.run(w)
            m = report.run_metrics(res)
            rounds, tokens, wall = rounds + 1, tokens + m["tokens"], wall + res["wall_s"]
        spy_proc.wait()
    if not raw.exists():
        return {"error": f"py-spy wrote nothing; see {log_dir / 'py-spy.log'}"}
    parsed = parse_collapsed(raw)
    parsed.update(
        {
            "rate": rate,
            "native": native,
            "subprocesses": subprocesses,
            "workload": w.to_json(),
            "target": target.key,
            "seconds": seconds,
            "rounds": rounds,
            "tok_s_while_profiling": tokens / wall if wall else None,
            "collapsed_stacks": str(raw),
        }
    )
    return parsed


def _perf_split(
    targets: dict[str, Target], all_w: dict[str, Workload], name: str, seconds: float, log_dir: Path
) -> dict[str, Any]:
    why = perfsplit.available()
    w = all_w.get(name)
    if why or w is None or w.kind != "raw":
        return {"error": why or f"--perf-workload {name}: a raw workload is needed"}
    out: dict[str, Any] = {}
    for key in ("A", "B", "B'", "B:nowrite", "B:discard", "B:nosend", "Bi", "G"):
        target = targets.get(key)
        if target is None:
            continue
        _say(f"perf: {key} (pid {target.serving_pid}) under {w.name}, {seconds:g} s")

        def once(target: Target = target) -> int:
            time.sleep(0.3)
            return int(report.run_metrics(target.run(w))["tokens"])

        out[key] = perfsplit.measure(
            target.serving_pid, seconds, once, lambda pid: cpu_seconds(pid, False), log_dir, key
        )
    return out


def _autogroup() -> str:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _floor(summary: dict[str, Any], log_dir: Path, transport: str) -> dict[str, Any] | None:
    """The gRPC transport alone at A's c1 token cadence (after every engine has stopped)."""
    cadence = (summary.get("c1", {}).get("A") or {}).get("itl_p50_ms") or 2.0
    _say(f"gRPC floor ({transport}): trivial server, messages {cadence:.2f} ms apart")
    with open(log_dir / f"floor-{transport}.log", "wb") as log:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.floor",
                "--cadence-ms",
                f"{cadence:.3f}",
                "--transport",
                transport,
            ],
            cwd=ROOT,
            env=quiet_child_env(),
            stdout=subprocess.PIPE,
            stderr=log,
            timeout=300,
            check=False,
        )
    try:
        return {"transport": transport, **json.loads(done.stdout)}
    except ValueError:
        _say(f"gRPC floor failed (exit {done.returncode}): see {log_dir}/floor-{transport}.log")
        return None


def main(argv: list[str] | None = None) -> int:
    global SEPARATE_SESSIONS, CLIENT_NICE
    args = parse_args(argv)
    SEPARATE_SESSIONS = args.separate_sessions
    CLIENT_NICE = args.client_nice
    common.EXTRA_OPTIONS[:] = args.engine_option
    # Children inherit these: bench.common.run_async and the worker's --event-loop.
    os.environ["BENCH_LOOP"] = args.loop
    os.environ["BACKEND_EVENT_LOOP"] = args.loop
    os.environ["BACKEND_TRANSPORT"] = args.transport
    all_w = {w.name: w for w in workloads(args.quick)}
    chosen = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in all_w]
    if unknown:
        print(f"unknown workloads {unknown}; choose from {', '.join(all_w)}", file=sys.stderr)
        return 2
    ws = [all_w[n] for n in chosen]
    longest = max((w.tokens for w in ws if w.kind == "raw"), default=256)
    max_model_len = 2048 if longest + 128 <= 2048 else 4096

    if args.model == "smollm2":
        # The real-model cell: `python -m bench --model smollm2 --workloads c1,c8`.
        from tools import real_models

        model_dir = str(real_models.smollm2())
    elif args.model:
        model_dir = str(Path(args.model).resolve())
    else:
        from tools.tiny_model import build_tiny_model, default_model_dir

        model_dir = str(build_tiny_model(default_model_dir()))

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = LOG_ROOT / stamp
    log_dir.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    _say(
        f"bench {'quick' if args.quick else 'full'}: {args.repeats} repeats, workloads "
        f"{','.join(chosen)}, model {model_dir}, logs {log_dir}"
    )
    if load_before[0] > 1.5:
        _say(f"WARNING: load average {load_before[0]:.2f} > 1.5: numbers will be noisy")

    logs: list[IO[bytes]] = []

    def log(name: str) -> IO[bytes]:
        f = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed at the end
        logs.append(f)
        return f

    targets: dict[str, Target] = {}
    runs: list[dict[str, Any]] = []
    idle: dict[str, float] = {}
    prof: dict[str, Any] | None = None
    split: dict[str, Any] | None = None
    need_raw = any(w.kind == "raw" for w in ws)
    need_chat = any(w.kind == "chat" for w in ws)
    t_start = time.perf_counter()
    try:
        # Processes first (imports, not timed), one at a time; then the timed engine loads.
        _say("starting worker B (python -m backend)")
        targets["B"] = WorkerTarget("B", log("worker-B"), log("client-B"), args.gc_probe)
        if need_chat:
            _say("starting worker Bp (python -m backend; parsers)")
            targets["Bp"] = WorkerTarget("Bp", log("worker-Bp"), log("client-Bp"), args.gc_probe)
        if need_raw:
            _say("starting the in-process driver A")
            targets["A"] = InProcTarget(log("driver-A"), args.gc_probe)
            targets["A"].client.call({"op": "ping"}, timeout=600)  # type: ignore[union-attr]
        for t in targets.values():
            if t.client is not None:
                t.client.call({"op": "ping"}, timeout=600)

        if "A" in targets:
            _say("A: constructing AsyncLLM")
            targets["A"].load(model_options(model_dir, max_model_len))  # type: ignore[attr-defined]
        _say("B: LoadModel (tool_parser:none, reasoning_parser:none)")
        targets["B"].load(model_options(model_dir, max_model_len))  # type: ignore[attr-defined]
        if "Bp" in targets:
            _say("Bp: LoadModel (tool_parser:hermes, reasoning_parser:qwen3)")
            targets["Bp"].load(  # type: ignore[attr-defined]
                model_options(model_dir, max_model_len, parsers=True)
            )
        if need_raw and not args.no_go:
            program = build_go_client()
            if program is not None:
                _say("Bg: the Go client on worker B")
                targets["Bg"] = GoClientTarget(targets["B"], program, log("client-Bg"))  # type: ignore[arg-type]
                targets["Bg"].client.call({"op": "ping"}, timeout=60)  # type: ignore[union-attr]
        if args.with_grpcio and need_raw and args.transport != "grpcio":
            _say("starting worker Bi (python -m backend, grpcio transport)")
            targets["Bi"] = WorkerTarget(
                "Bi", log("worker-Bi"), log("client-Bi"), args.gc_probe, transport="grpcio"
            )
            targets["Bi"].client.call({"op": "ping"}, timeout=600)  # type: ignore[union-attr]
            _say("Bi: LoadModel (tool_parser:none, reasoning_parser:none)")
            targets["Bi"].load(model_options(model_dir, max_model_len))  # type: ignore[attr-defined]
        if args.worker_tree is not None and need_raw:
            tree = args.worker_tree.resolve()
            _say(f"starting worker B' (python -m backend from {tree})")
            targets["B'"] = WorkerTarget(
                "B'", log("worker-Bprime"), log("client-Bprime"), False, tree=tree
            )
            targets["B'"].client.call({"op": "ping"}, timeout=600)  # type: ignore[union-attr]
            _say("B': LoadModel (tool_parser:none, reasoning_parser:none)")
            targets["B'"].load(model_options(model_dir, max_model_len))  # type: ignore[attr-defined]
        for cut in args.worker_cut if need_raw else ():
            key = f"B:{cut}"
            _say(f"starting worker {key} (python -m bench.cuts --cut {cut})")
            targets[key] = WorkerTarget(
                key, log(f"worker-{key}"), log(f"client-{key}"), False, cut=cut
            )
            targets[key].client.call({"op": "ping"}, timeout=600)  # type: ignore[union-attr]
            _say(f"{key}: LoadModel (tool_parser:none, reasoning_parser:none)")
            targets[key].load(model_options(model_dir, max_model_len))  # type: ignore[attr-defined]
        if args.with_vllm_grpc and need_raw:
            why = vllm_grpc.missing()
            if why is not None:
                _say(f"G (vLLM's own gRPC server) skipped: {why}")
            else:
                _say("G: starting vLLM's own gRPC server (smg-grpc-servicer)")
                targets["G"] = VllmGrpcTarget(
                    model_dir, max_model_len, log("vllm-grpc-G"), log("client-G")
                )
                targets["G"].client.call({"op": "ping"}, timeout=600)  # type: ignore[union-attr]
        if args.with_openai and need_raw:
            _say("C: starting vLLM's OpenAI server")
            targets["C"] = OpenAITarget(model_dir, max_model_len, log("openai-C"), log("client-C"))
            targets["C"].client.call({"op": "ping"}, timeout=600)  # type: ignore[union-attr]
        for key, t in targets.items():
            if t.load_seconds is not None:
                _say(f"{key}: engine ready in {t.load_seconds:.2f}s; warming up")
            _warm(t, ws)
        if args.idle_seconds > 0:
            time.sleep(args.settle)
            before = {k: cpu_seconds(t.serving_pid, True) for k, t in targets.items() if k != "Bg"}
            time.sleep(args.idle_seconds)
            idle = {
                k: round(
                    100.0 * (cpu_seconds(t.serving_pid, True) - before[k]) / args.idle_seconds, 1
                )
                for k, t in targets.items()
                if k != "Bg"
            }
            _say(f"idle CPU % of each serving tree (all idle): {idle}")

        order = ["A", "B", "B'", *(f"B:{c}" for c in args.worker_cut), "Bi", "G", "Bg", "Bp", "C"]
        for rep in range(args.repeats):
            for w in ws:
                for key in order:
                    target = targets.get(key)
                    if target is None or not target.supports(w):
                        continue
                    if w.kind == "raw" and key == "Bp":
                        continue  # Bp only for the parsers-on chat comparison
                    time.sleep(args.settle)
                    raw = target.run(w)
                    m = report.run_metrics(raw)
                    runs.append(
                        {
                            "repeat": rep,
                            "workload": w.name,
                            "target": key,
                            "metrics": m,
                            "wall_s": raw["wall_s"],
                            "ttfts_ms": [r["ttft_ms"] for r in raw["requests"]],
                            "server_ttfts_ms": [r.get("server_ttft_ms") for r in raw["requests"]],
                            "gc": raw.get("gc"),
                            "main_threads_cpu_s": raw.get("main_threads_cpu_s"),
                            "client_self_cpu_s": raw.get("self_cpu_s"),
                        }
                    )
                    _say(
                        f"rep {rep + 1}/{args.repeats} {w.name:6} {key:2} "
                        f"{m['tok_s'] or 0:8.1f} tok/s  TTFT p50 {m['ttft_p50_ms'] or 0:7.2f} ms  "
                        f"ITL p50 {m['itl_p50_ms'] or 0:5.2f} ms  tree CPU {m['tree_cpu_s']:.2f}s"
                        + (f"  ERRORS {m['errors']}: {m['first_error']}" if m["errors"] else "")
                    )

        if args.profile > 0:
            pw = all_w.get(args.profile_workload)
            if pw is None:
                raise SystemExit(f"unknown --profile-workload {args.profile_workload}")
            worker = targets["Bp"] if pw.kind == "chat" and "Bp" in targets else targets["B"]
            assert isinstance(worker, WorkerTarget)
            _say(f"profiling worker {worker.key} (pid {worker.serving_pid}) under {pw.name}")
            prof = _profile(
                worker, pw, args.profile, log_dir, args.profile_native, args.profile_engine
            )
        if args.perf > 0:
            split = _perf_split(targets, all_w, args.perf_workload, args.perf, log_dir)
    finally:
        # Nothing is measured any more: stop all targets at once.
        _say(f"stopping {', '.join(targets)}")
        stoppers = [
            threading.Thread(target=_quietly, args=(t.stop,), name=f"stop-{k}")
            for k, t in targets.items()
        ]
        for th in stoppers:
            th.start()
        for th in stoppers:
            th.join()
        for f in logs:
            f.close()

    summary = report.summarize(runs)
    comps = report.comparisons(runs)
    loads = {k: t.load_seconds for k, t in targets.items()}
    floors = {}
    if not args.no_floor:  # the workers' transport first, the other for comparison
        for transport in dict.fromkeys((args.transport, *TRANSPORTS)):
            floors[transport] = _floor(summary, log_dir, transport)
    floor = floors.get(args.transport)
    goal_rows = report.goals(comps, summary, loads, floor)
    a_spread = report.spread(runs)
    result = {
        "meta": {
            "timestamp": stamp,
            "mode": "quick" if args.quick else "full",
            "argv": sys.argv[1:] if argv is None else argv,
            "repeats": args.repeats,
            "workloads": [w.to_json() for w in ws],
            "model": model_dir,
            "max_model_len": max_model_len,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "cpus": os.cpu_count(),
            "separate_sessions": args.separate_sessions,
            "client_nice": args.client_nice,
            "event_loop": args.loop,
            "transport": args.transport,
            "engine_options": args.engine_option,
            "sched_autogroup_enabled": _autogroup(),
            "python": platform.python_version(),
            "git": _git_commit(),
            "duration_s": time.perf_counter() - t_start,
            "logs": str(log_dir),
        },
        "load_seconds": loads,
        "load_details": {
            k: {kk: vv for kk, vv in t.load_info.items() if kk != "op"} for k, t in targets.items()
        },
        "idle_cpu_pct": idle,
        "summary": summary,
        "comparisons": comps,
        "goals": goal_rows,
        "a_spread_tok_s": a_spread,
        "profile": prof,
        "perf_split": split,
        "floor": floor,
        "floors": floors,
        "runs": runs,
    }
    out = out_dir / f"{stamp}.json"
    out.write_text(json.dumps(result, indent=1))
    print()
    print(report.table(summary, comps, goal_rows))
    print(report.noise_line(a_spread))
    print()
    print(report.side_by_side(comps))
    print()
    print(
        "engine load: "
        + ", ".join(f"{k} {v:.2f}s" for k, v in loads.items() if v is not None)
        + "  (A: AsyncLLM.from_engine_args; B/Bp/Bi: LoadModel RPC; C, G: process start to healthy)"
    )
    for key, t in targets.items():
        if "engine_seconds" in t.load_info:
            print(
                f"  {key} LoadModel {t.load_seconds:.2f}s = engine construction inside the worker "
                f"{t.load_info['engine_seconds']:.2f}s + {t.load_info['overhead_seconds']:.2f}s "
                "(option parsing, parsers, chat renderer, RPC)"
            )
    print(
        f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} "
        f"(per-run values in the JSON)"
    )
    for transport, fl in floors.items():
        if fl:
            print(
                f"gRPC floor, {transport} server (bench/floor.py, no engine): first message "
                f"{fl['ttft_ms']:.2f} ms p50, server CPU {fl['server_cpu_us_per_msg']:.0f} "
                f"µs/message at {fl['cadence_ms']:.2f} ms cadence"
            )
    if prof and "self" in prof:
        print()
        print(format_profile(prof))
    elif prof:
        print(f"profile: {prof.get('error')}")
    if split:
        print()
        print(perfsplit.format_split(split))
    print(f"\nresults: {out}")
    return 0
