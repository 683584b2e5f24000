"""End-to-end harness: drive the packaged worker through run.sh over gRPC, like the gateway.

    venv/bin/python tests/e2e/harness.py          (what `make test-e2e` runs)

Builds (or reuses) the packaged worker directory (runs ./package.sh when ./lib lacks the
bundled libraries), starts `run.sh --addr 127.0.0.1:PORT` on a free port in its own
process group, polls Health until it answers, calls LoadModel, then runs the selected
capabilities. Prints one line per capability:

    PASS name (123ms) - detail      FAIL name: reason      SKIP name: reason

and, last, exactly `N passed, M failed` (`, K skipped` appended when any were skipped).
Lines starting with `#` are information. Exits 1 on any failure (2 on a bad
configuration, 130 when interrupted). The worker it started is always stopped (also on
Ctrl-C / SIGTERM), and a final `shutdown` check fails if any worker or engine process
is left behind.

Environment:
  BACKEND_TEST_CAPS        comma list, run in a fixed order (default: health,load,
                           bundled-libs,predict,stream,tokenize,tools,reasoning,logprobs,
                           cancel,free). Also: embeddings, rerank, score (SKIP when the
                           worker answers FAILED_PRECONDITION / UNIMPLEMENTED).
                           Without `load`, no LoadModel is sent (for a worker given by
                           BACKEND_TEST_ADDR that already serves a model).
  BACKEND_TEST_MODEL_NAME  HF id or local directory (default: the tiny random-weight model
                           built by tools/tiny_model.py, whose tool call / reasoning
                           outputs are forced with a GBNF grammar + LogitBias as in
                           tests/integration/chat_helpers.py). With any other model,
                           tools asks in plain words for a call of BACKEND_TEST_TOOL_NAME
                           (no grammar) and reasoning asks with enable_thinking=true;
                           each is SKIPped when the worker's LoadModel reply says it has
                           no tool / reasoning parser for the model.
  BACKEND_TEST_OPTIONS     ModelOptions.Options, comma-separated (commas inside {...},
                           [...] or quotes do not split). Default for the tiny model: the
                           KV-cache size, tool_parser:hermes, reasoning_parser:qwen3 and
                           --structured-outputs-config:{"enable_in_reasoning": true};
                           for another model: none.
  BACKEND_TEST_LOAD_JSON   extra ModelOptions fields as a JSON object, e.g.
                           {"DType": "float32", "MaxModelLen": 4096} (for a real model).
  BACKEND_TEST_PROMPT      prompt for predict/stream/tokenize/logprobs/cancel.
  BACKEND_TEST_TOOL_NAME   the function the tools capability expects (default get_weather).
  BACKEND_TEST_ADDR        HOST:PORT of a worker that is already running: use it instead of
                           starting one (it is not stopped; process checks use the pid
                           listening on that port when it can be found).
  BACKEND_TEST_TIMEOUT     seconds for LoadModel and for the worker to become healthy
                           (default 300).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psutil  # noqa: E402

from backend.gen import backend_pb2 as pb  # noqa: E402
from backend.gen import backend_pb2_grpc  # noqa: E402
from tests import engine_control  # noqa: E402
from tests.conftest import KV_CACHE_OPTION, free_port, tiny_load_options  # noqa: E402
from tests.engine_control import descendants, engine_processes  # noqa: E402
from tests.integration.chat_helpers import WEATHER_TOOL, chat_request, collect  # noqa: E402
from tests.integration.conftest import CHAT_OPTIONS  # noqa: E402

DEFAULT_CAPS = (
    "health,load,bundled-libs,predict,stream,tokenize,tools,reasoning,logprobs,cancel,free"
)
# Run order, whatever order BACKEND_TEST_CAPS lists them in (free unloads: last).
ORDER = (
    "health",
    "load",
    "bundled-libs",
    "predict",
    "stream",
    "tokenize",
    "tools",
    "reasoning",
    "logprobs",
    "embeddings",
    "rerank",
    "score",
    "cancel",
    "free",
)
BUNDLED = ("libnuma", "libgomp")
CANCEL_READY_WITHIN = 2.0
SKIP_CODES = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED)


class ConfigError(Exception):
    """Bad BACKEND_TEST_* settings (exit status 2)."""


class Skip(Exception):
    """The capability does not apply to this worker/model."""


class Failed(Exception):
    """The capability's check failed."""


def check(cond: Any, message: str) -> None:
    # Not `assert`: must also hold under python -O.
    if not cond:
        raise Failed(message)


def state_name(state: int) -> str:
    return pb.StatusResponse.State.Name(state)


def info(text: str) -> None:
    print(f"# {text}", flush=True)


# ------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------


def split_options(raw: str) -> list[str]:
    """Split at commas outside {...}, [...] and quotes (JSON values stay whole)."""
    out: list[str] = []
    buf: list[str] = []
    depth, quote = 0, ""
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(buf).strip())
            buf = []
            continue
        buf.append(ch)
    out.append("".join(buf).strip())
    return [o for o in out if o]


@dataclass
class Config:
    caps: list[str]
    model: str
    tiny: bool
    options: list[str]
    load_fields: dict[str, Any]
    prompt: str
    tool_name: str
    addr: str | None
    timeout: float

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ = os.environ) -> Config:
        caps = [c.strip().lower() for c in env.get("BACKEND_TEST_CAPS", DEFAULT_CAPS).split(",")]
        caps = [c for c in caps if c]
        unknown = sorted(set(caps) - set(ORDER))
        if unknown:
            raise ConfigError(f"unknown capabilities {unknown}; known: {', '.join(ORDER)}")
        model = env.get("BACKEND_TEST_MODEL_NAME", "").strip()
        tiny = not model or (
            Path(model).is_dir() and (Path(model) / ".tiny_model_stamp.json").exists()
        )
        if not model and any(c in caps for c in ORDER if c != "health"):
            from tools.tiny_model import build_tiny_model, default_model_dir

            model = str(build_tiny_model(default_model_dir()))
        if "BACKEND_TEST_OPTIONS" in env:
            options = split_options(env["BACKEND_TEST_OPTIONS"])
        elif tiny:
            options = [KV_CACHE_OPTION, *CHAT_OPTIONS]
        else:
            options = []
        load_fields: dict[str, Any] = {}
        if env.get("BACKEND_TEST_LOAD_JSON"):
            try:
                load_fields = json.loads(env["BACKEND_TEST_LOAD_JSON"])
            except json.JSONDecodeError as e:
                raise ConfigError(f"BACKEND_TEST_LOAD_JSON is not JSON: {e}") from None
            if not isinstance(load_fields, dict):
                raise ConfigError("BACKEND_TEST_LOAD_JSON must be a JSON object")
        return cls(
            caps=[c for c in ORDER if c in caps],
            model=model,
            tiny=tiny,
            options=options,
            load_fields=load_fields,
            prompt=env.get("BACKEND_TEST_PROMPT") or "Once upon a time, in a small village,",
            tool_name=env.get("BACKEND_TEST_TOOL_NAME") or "get_weather",
            addr=env.get("BACKEND_TEST_ADDR") or None,
            timeout=float(env.get("BACKEND_TEST_TIMEOUT") or 300),
        )

    def load_options(self) -> pb.ModelOptions:
        if self.tiny:  # the tests' settings for the tiny model on CPU (float32, eager, ...)
            return tiny_load_options(
                Path(self.model), *self.options, kv_cache=False, **self.load_fields
            )
        return pb.ModelOptions(Model=self.model, Options=self.options, **self.load_fields)


# ------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------


def is_zombie(p: psutil.Process) -> bool:
    """Exited: gone, or a zombie (pid-reuse safe: is_running checks the start time)."""
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(procs: list[psutil.Process], timeout: float) -> tuple[list[str], list[str]]:
    """Wait until every process has exited. A zombie has exited (no memory, no code
    running) but its parent has not reaped it: counted as gone, returned apart.
    Returns (still running, zombies) as "pid name" strings."""
    deadline = time.monotonic() + timeout
    while True:
        running = [p for p in procs if not is_zombie(p)]
        if not running or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    zombies = [p for p in procs if p.is_running() and is_zombie(p)]
    return [str(p.pid) for p in running], [describe_zombie(p) for p in zombies]


def describe_zombie(p: psutil.Process) -> str:
    try:
        name, ppid = p.name(), p.ppid()
    except psutil.Error:
        return str(p.pid)
    return f"{p.pid} {name} (parent {'init' if ppid == 1 else ppid})"


def session_members(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if p.pid != os.getpid() and os.getsid(p.pid) == sid:
                out.append(p)
    return out


def listener_pid(addr: str) -> int | None:
    port = int(addr.rsplit(":", 1)[1])
    with contextlib.suppress(psutil.Error):
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return c.pid
    return None


def ensure_packaged() -> None:
    lib = ROOT / "lib"
    if all((lib / f"{name}.so.1").exists() for name in BUNDLED):
        info(f"packaged worker: reusing {lib}")
        return
    info("packaged worker: ./lib incomplete, running ./package.sh")
    proc = subprocess.run(
        [str(ROOT / "package.sh")], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise Failed(f"./package.sh failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")


class StartedWorker:
    """`run.sh --addr 127.0.0.1:PORT` in its own session (process group)."""

    def __init__(self) -> None:
        self.addr = f"127.0.0.1:{free_port()}"
        fd, path = tempfile.mkstemp(
            prefix=f"e2e-worker-{self.addr.rsplit(':', 1)[1]}-", suffix=".log"
        )
        self.log_path = Path(path)
        self._log = os.fdopen(fd, "wb")
        env = {k: v for k, v in os.environ.items() if k != "LOCALAI_GRPC_AUTH_TOKEN"}
        # cancel stops the engine core on the "first output" line this logs.
        env["BACKEND_DEBUG_REQUESTS"] = "1"
        self.proc = subprocess.Popen(
            [str(ROOT / "run.sh"), "--addr", self.addr],
            cwd="/",  # run.sh must work from any directory
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.proc.pid  # run.sh execs python: the same pid is the worker
        self.seen: dict[int, psutil.Process] = {}
        self.zombies: list[str] = []

    def remember_children(self) -> None:
        for p in descendants(self.pid):
            self.seen.setdefault(p.pid, p)

    def log_tail(self, n: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, grace: float = 40.0) -> list[str]:
        """SIGTERM (graceful: the worker stops its engine), SIGKILL to the whole process
        group after `grace` seconds. Returns what went wrong: processes left behind
        (then killed)."""
        self.remember_children()
        problems = []
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                problems.append(
                    f"worker {self.pid} still running {grace:.0f}s after SIGTERM "
                    "(process group killed)"
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        procs = list(self.seen.values())
        known = {p.pid for p in procs}
        procs += [p for p in session_members(self.pid) if p.pid not in known]
        running, self.zombies = wait_gone(procs, timeout=10)
        for p in procs:
            if str(p.pid) in running:
                with contextlib.suppress(psutil.Error):
                    problems.append(f"left behind: {p.pid} {' '.join(p.cmdline())[:80]}")
                    p.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._log.close()
        return problems


# ------------------------------------------------------------------------------------
# helpers for chat requests (tiny model: forced with a grammar, as in chat_helpers)
# ------------------------------------------------------------------------------------


def tool_schema(name: str) -> dict[str, Any]:
    """The tests' weather tool (one required `city` string) under another name."""
    tool: dict[str, Any] = copy.deepcopy(WEATHER_TOOL)
    tool["function"]["name"] = name
    return tool


@dataclass
class Outcome:
    name: str
    status: str  # PASS | FAIL | SKIP
    ms: float = 0.0
    detail: str = ""

    def line(self) -> str:
        if self.status == "PASS":
            return f"PASS {self.name} ({self.ms:.0f}ms)" + (
                f" - {self.detail}" if self.detail else ""
            )
        return f"{self.status} {self.name}: {self.detail}"


@dataclass
class Harness:
    cfg: Config
    stub: Any = None
    channel: Any = None
    worker: StartedWorker | None = None
    worker_pid: int | None = None
    loaded: bool = False
    results: list[Outcome] = field(default_factory=list)
    load_message: str = ""

    # ---- plumbing -------------------------------------------------------------

    def record(self, outcome: Outcome) -> None:
        self.results.append(outcome)
        print(outcome.line(), flush=True)

    def run_cap(self, name: str, fn: Callable[[], str | None]) -> None:
        started = time.monotonic()
        try:
            detail = fn() or ""
        except Skip as e:
            self.record(Outcome(name, "SKIP", detail=str(e)))
        except Failed as e:
            self.record(Outcome(name, "FAIL", detail=str(e)))
        except grpc.RpcError as e:
            self.record(Outcome(name, "FAIL", detail=f"{e.code().name}: {e.details()}"))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            self.record(Outcome(name, "FAIL", detail=f"{type(e).__name__}: {e}"))
        else:
            self.record(Outcome(name, "PASS", (time.monotonic() - started) * 1000, detail))

    def status(self) -> int:
        return self.stub.Status(pb.HealthMessage(), timeout=10).state

    def predict_request(self, **kw: Any) -> pb.PredictOptions:
        base: dict[str, Any] = dict(Prompt=self.cfg.prompt, Tokens=24, Temperature=0.0, Seed=1)
        if self.cfg.tiny:
            base["IgnoreEOS"] = True  # random weights may stop at once
        base.update(kw)
        return pb.PredictOptions(**base)

    def require_parser(self, kind: str) -> None:
        """Skip a real model's tools/reasoning when the worker serves it without that
        parser. The worker picks parsers from Options or the model family and names
        them in its LoadModel reply ("tool parser hermes, reasoning parser none"); for
        a worker loaded by someone else that is unknown, and the check runs."""
        m = re.search(rf"\b{kind} parser (\S+?)[,)]", self.load_message)
        if m and m.group(1) == "none":
            raise Skip(f"the worker has no {kind} parser for this model (set {kind}_parser:NAME)")

    def chat(self, messages: list[dict[str, str]], *, forced: str | None = None, **kw: Any):
        return chat_request(self.stub, messages, forced=forced, **kw)

    def both(self, req: pb.PredictOptions):
        """(unary, streamed) results of one chat request, accumulated like the gateway."""
        return (
            collect([self.stub.Predict(req, timeout=180)]),
            collect(self.stub.PredictStream(req, timeout=180)),
        )

    # ---- start / connect ---------------------------------------------------------

    def connect(self) -> float:
        """Start the worker (or use BACKEND_TEST_ADDR), poll Health. Returns seconds."""
        started = time.monotonic()
        if self.cfg.addr:
            addr = self.cfg.addr
        else:
            ensure_packaged()
            self.worker = StartedWorker()
            addr = self.worker.addr
            self.worker_pid = self.worker.pid
            info(
                f"worker: {ROOT / 'run.sh'} --addr {addr} "
                f"(pid {self.worker.pid}, log {self.worker.log_path})"
            )
        self.channel = grpc.insecure_channel(addr)
        self.stub = backend_pb2_grpc.BackendStub(self.channel)
        deadline = time.monotonic() + self.cfg.timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.worker and self.worker.proc.poll() is not None:
                raise Failed(
                    f"worker exited with {self.worker.proc.returncode} before answering Health:\n"
                    + self.worker.log_tail()
                )
            try:
                reply = self.stub.Health(pb.HealthMessage(), timeout=2)
                check(reply.message == b"OK", f"Health answered {reply.message!r}, expected b'OK'")
                if self.cfg.addr:  # now that it listens
                    self.worker_pid = listener_pid(addr)
                return time.monotonic() - started
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
                time.sleep(0.2)
        raise Failed(f"no Health answer within {self.cfg.timeout:.0f}s ({last})")

    # ---- capabilities --------------------------------------------------------------

    def cap_health(self) -> str:
        reply = self.stub.Health(pb.HealthMessage(), timeout=5)
        check(reply.message == b"OK", f"Health answered {reply.message!r}")
        if self.worker:  # a fresh worker has no model yet
            state = self.status()
            check(
                state == pb.StatusResponse.UNINITIALIZED,
                f"Status before LoadModel is {state_name(state)}, expected UNINITIALIZED",
            )
        return "Health OK" + (", Status UNINITIALIZED" if self.worker else "")

    def cap_load(self) -> str:
        result = self.stub.LoadModel(self.cfg.load_options(), timeout=self.cfg.timeout)
        if not result.success:
            tail = f"\n{self.worker.log_tail()}" if self.worker else ""
            raise Failed(f"LoadModel: {result.message}{tail}")
        self.loaded = True
        self.load_message = result.message
        state = self.status()
        check(
            state == pb.StatusResponse.READY,
            f"Status after LoadModel is {state_name(state)}",
        )
        if self.worker:
            self.worker.remember_children()
        model = Path(self.cfg.model).name if self.cfg.tiny else self.cfg.model
        return f"{model}: {result.message[:100]}"

    def cap_bundled_libs(self) -> str:
        """What the worker's processes really map, from /proc/PID/maps.

        libnuma must come from ./lib (nothing in the venv ships it; vllm/_C needs it).
        libgomp: run.sh's LD_LIBRARY_PATH makes ./lib's copy win over torch's RUNPATH
        in the worker process, but vLLM's CPU platform puts torch's own libgomp into
        LD_PRELOAD before it spawns the engine processes (vllm issue 27369), so those
        map torch/lib/libgomp.so.1 whatever ./lib holds. That passes only if it is
        byte-identical to the bundled copy (package.sh bundles torch's own file), and
        no process may map two OpenMP runtimes of the same soname.
        """
        if self.worker_pid is None:
            raise Skip(
                f"pid of the worker at {self.cfg.addr} not found (needs permission to list sockets)"
            )
        lib = (ROOT / "lib").resolve()
        worker = psutil.Process(self.worker_pid)
        engines = engine_processes(self.worker_pid, unreaped=True)
        check(engines, "no engine process under the worker (is a model loaded?)")

        def short(path: str) -> str:
            p = Path(path)
            if "site-packages" in p.parts:
                return "/".join(p.parts[p.parts.index("site-packages") + 1 :])
            return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path

        mapped: dict[int, dict[str, set[str]]] = {}
        renamed: set[str] = set()
        for p in (worker, *engines):
            try:
                maps = Path(f"/proc/{p.pid}/maps").read_text()
            except OSError as e:
                raise Skip(f"cannot read /proc/{p.pid}/maps: {e}") from None
            mine: dict[str, set[str]] = {n: set() for n in BUNDLED}
            for line in maps.splitlines():
                parts = line.split(None, 5)
                if len(parts) < 6 or not parts[5].startswith("/"):
                    continue
                path = parts[5].removesuffix(" (deleted)")
                base = os.path.basename(path)
                for n in BUNDLED:
                    if base.startswith(n + ".so"):
                        mine[n].add(str(Path(path).resolve()))
                    elif base.startswith(n + "-"):  # auditwheel-renamed private copy
                        renamed.add(short(path))
            mapped[p.pid] = mine

        problems = []
        names = {p.pid: ("worker" if p.pid == worker.pid else p.name()) for p in (worker, *engines)}
        numa = {x for m in mapped.values() for x in m["libnuma"]}
        if not any(mapped[p.pid]["libnuma"] for p in engines):
            problems.append("no engine process maps libnuma (vllm._C not loaded?)")
        outside = sorted(x for x in numa if not Path(x).is_relative_to(lib))
        if outside:
            problems.append(f"libnuma loaded from outside {lib}: {outside}")
        bundled_gomp = (lib / "libgomp.so.1").resolve()
        gomp_where: dict[str, list[str]] = {}
        for pid, m in mapped.items():
            if len(m["libgomp"]) > 1:
                problems.append(
                    f"{names[pid]} {pid} maps {len(m['libgomp'])} libgomp: {sorted(m['libgomp'])}"
                )
            for x in m["libgomp"]:
                gomp_where.setdefault(x, []).append(names[pid])
        notes = []
        for x, who in sorted(gomp_where.items()):
            if Path(x).is_relative_to(lib):
                notes.append(f"{short(x)} in {', '.join(who)}")
                continue
            same = bundled_gomp.exists() and Path(x).read_bytes() == bundled_gomp.read_bytes()
            why = ""
            pid = (
                next(p.pid for p in engines if x in mapped[p.pid]["libgomp"])
                if any(x in mapped[p.pid]["libgomp"] for p in engines)
                else worker.pid
            )
            with contextlib.suppress(OSError):
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                preload = next((e[11:].decode() for e in env if e.startswith(b"LD_PRELOAD=")), "")
                if x in {str(Path(q).resolve()) for q in preload.replace(" ", ":").split(":") if q}:
                    why = "via LD_PRELOAD set by vLLM's CPU platform, "
            notes.append(
                f"{short(x)} in {', '.join(who)} ({why}"
                f"{'byte-identical to' if same else 'DIFFERENT from'} lib/libgomp.so.1)"
            )
            if not same:
                problems.append(f"{short(x)} is loaded and is not the bundled libgomp")
        if not gomp_where:
            problems.append("no libgomp mapped in the worker or its engine processes")
        check(not problems, "; ".join(problems))
        numa_who = [names[p] for p, m in mapped.items() if m["libnuma"]]
        detail = (
            f"libnuma: {', '.join(short(x) for x in sorted(numa))} in {', '.join(numa_who)}; "
            f"libgomp: {'; '.join(notes)}"
        )
        if renamed:
            detail += f"; also mapped, own soname: {', '.join(sorted(renamed))}"
        return detail

    def cap_predict(self) -> str:
        reply = self.stub.Predict(self.predict_request(), timeout=120)
        text = reply.message.decode()
        check(text.strip(), f"empty text ({reply.tokens} tokens)")
        check(reply.tokens > 0, f"tokens={reply.tokens}")
        check(reply.prompt_tokens > 0, f"prompt_tokens={reply.prompt_tokens}")
        if self.cfg.tiny:
            check(reply.tokens == 24, f"IgnoreEOS with Tokens=24 gave {reply.tokens} tokens")
        return f"{reply.tokens} tokens, prompt {reply.prompt_tokens}: {text[:40]!r}"

    def cap_stream(self) -> str:
        unary = self.stub.Predict(self.predict_request(), timeout=120)
        chunks = list(self.stub.PredictStream(self.predict_request(), timeout=120))
        check(len(chunks) > 1, f"only {len(chunks)} chunk(s)")
        text = b"".join(c.message for c in chunks).decode()
        check(
            text == unary.message.decode(),
            f"streamed text {text!r} != unary greedy text {unary.message.decode()!r}",
        )
        final = chunks[-1]
        check(
            final.tokens == unary.tokens, f"final Reply tokens={final.tokens}, unary {unary.tokens}"
        )
        check(final.prompt_tokens > 0, f"final Reply prompt_tokens={final.prompt_tokens}")
        check(
            final.timing_token_generation > 0 or final.timing_prompt_processing > 0,
            "final Reply has no timings",
        )
        return f"{len(chunks)} chunks == unary text, usage {final.prompt_tokens}+{final.tokens}"

    def cap_tokenize(self) -> str:
        tok = self.stub.TokenizeString(pb.PredictOptions(Prompt=self.cfg.prompt), timeout=30)
        check(tok.tokens, "no tokens")
        check(tok.length == len(tok.tokens), f"length={tok.length} but {len(tok.tokens)} tokens")
        back = self.stub.Detokenize(
            pb.DetokenizeRequest(tokens=list(tok.tokens)), timeout=30
        ).content
        if back != self.cfg.prompt:
            # sentencepiece tokenizers may add a BOS (dropped) and a leading space
            check(
                not self.cfg.tiny and back.lstrip() == self.cfg.prompt.lstrip(),
                f"Detokenize(TokenizeString(p)) = {back!r} != {self.cfg.prompt!r}",
            )
        return f"{tok.length} tokens, Detokenize round trip exact" + (
            "" if back == self.cfg.prompt else " (modulo leading space)"
        )

    def cap_tools(self) -> str:
        name = self.cfg.tool_name
        tools = [tool_schema(name)]
        if self.cfg.tiny:
            forced = (
                "<think>\nI should call the tool.\n</think>\n\n"
                f'<tool_call>\n{{"name": "{name}", "arguments": {{"city": "Paris"}}}}\n</tool_call>'
            )
            user = [{"role": "user", "content": "What is the weather in Paris?"}]
            unary, streamed = self.both(self.chat(user, forced=forced, tools=tools))
            for label, res in (("unary", unary), ("streamed", streamed)):
                calls = res.structured()["calls"]
                check(calls == [(name, {"city": "Paris"})], f"{label}: tool calls {calls}")
                check(res.calls[0].id, f"{label}: tool call without id")
                check("<tool_call>" not in res.content, f"{label}: tag leaked into content")
            check(streamed.replies > 2, f"streamed in {streamed.replies} replies")
            return (
                f"{name}(city=Paris) structured, unary and streamed "
                f"({streamed.replies} chunks), grammar-forced"
            )
        self.require_parser("tool")
        user = [
            {
                "role": "user",
                "content": f"What is the weather in Paris right now? Call the {name} tool.",
            }
        ]
        unary, streamed = self.both(
            self.chat(user, tools=tools, tokens=512, metadata={"enable_thinking": "false"})
        )
        for label, res in (("unary", unary), ("streamed", streamed)):
            check(res.calls, f"{label}: no structured tool call; content {res.content[:200]!r}")
            call = res.calls[min(res.calls)]
            check(call.name == name, f"{label}: called {call.name!r}, expected {name!r}")
            try:
                args = json.loads(call.arguments)
            except json.JSONDecodeError:
                raise Failed(f"{label}: arguments are not JSON: {call.arguments!r}") from None
            check(isinstance(args, dict), f"{label}: arguments {args!r} not an object")
        args = json.loads(unary.calls[min(unary.calls)].arguments)
        return f"{name}({args}) structured, unary and streamed"

    def cap_reasoning(self) -> str:
        if self.cfg.tiny:
            forced = "<think>\nTwo plus two is four.\n</think>\n\nThe answer is 4."
            user = [{"role": "user", "content": "What is 2+2?"}]
            unary, streamed = self.both(self.chat(user, forced=forced))
            for label, res in (("unary", unary), ("streamed", streamed)):
                check(
                    res.reasoning == "\nTwo plus two is four.\n",
                    f"{label}: reasoning {res.reasoning!r}",
                )
                check(
                    res.content.strip() == "The answer is 4.", f"{label}: content {res.content!r}"
                )
                check(
                    "think>" not in res.message,
                    f"{label}: Reply.message {res.message!r} has the tags",
                )
            return "reasoning_content and content separated, unary and streamed (grammar-forced)"
        self.require_parser("reasoning")
        user = [{"role": "user", "content": "What is 17 + 25? Think step by step."}]
        unary, streamed = self.both(
            self.chat(user, tokens=1024, metadata={"enable_thinking": "true"})
        )
        for label, res in (("unary", unary), ("streamed", streamed)):
            check(
                res.reasoning.strip(),
                f"{label}: no reasoning_content; content {res.content[:200]!r}",
            )
            check("</think>" not in res.content, f"{label}: reasoning tag leaked into content")
        return f"reasoning {len(unary.reasoning)} chars, content {len(unary.content)} chars"

    def _check_logprobs(
        self, raw: bytes, tokens: int, text: str, top: int, label: str
    ) -> list[dict]:
        check(raw, f"{label}: no logprobs")
        data = json.loads(raw)
        entries = data.get("content")
        check(
            isinstance(entries, list),
            f"{label}: logprobs JSON has no content list: {str(data)[:200]}",
        )
        check(
            len(entries) == tokens, f"{label}: {len(entries)} logprob entries for {tokens} tokens"
        )
        for e in entries:
            check(
                {"token", "logprob", "bytes", "top_logprobs"} <= set(e),
                f"{label}: entry keys {sorted(e)}",
            )
            check(isinstance(e["token"], str) and e["logprob"] <= 0, f"{label}: bad entry {e}")
            check(
                all(isinstance(b, int) and 0 <= b < 256 for b in e["bytes"]),
                f"{label}: bytes {e['bytes']}",
            )
            check(
                len(e["top_logprobs"]) == top,
                f"{label}: {len(e['top_logprobs'])} top_logprobs, asked {top}",
            )
            tops = [t["logprob"] for t in e["top_logprobs"]]
            check(tops == sorted(tops, reverse=True), f"{label}: top_logprobs not sorted: {tops}")
            # greedy: the chosen token is the most likely one
            check(
                abs(e["logprob"] - tops[0]) < 1e-3, f"{label}: greedy token is not the top one: {e}"
            )
        # Each entry's bytes are its token's UTF-8. A token that is only part of a
        # UTF-8 sequence is decoded by vLLM as "" (and the text shows U+FFFD for it,
        # as with `vllm serve`), so the tokens spell the text minus replacement chars.
        for e in entries:
            check(
                bytes(e["bytes"]) == e["token"].encode(), f"{label}: bytes do not match token {e}"
            )
        spelled = "".join(e["token"] for e in entries)
        plain = text.replace("\ufffd", "")
        if self.cfg.tiny:
            check(spelled == plain, f"{label}: tokens spell {spelled!r}, text is {text!r}")
        else:  # a final EOS token is in the logprobs, not in the text
            check(spelled.startswith(plain), f"{label}: tokens spell {spelled!r}, text is {text!r}")
        return entries

    def cap_logprobs(self) -> str:
        req = self.predict_request(Tokens=12, Logprobs=1, TopLogprobs=3)
        unary = self.stub.Predict(req, timeout=120)
        u = self._check_logprobs(unary.logprobs, unary.tokens, unary.message.decode(), 3, "unary")
        chunks = list(self.stub.PredictStream(req, timeout=120))
        final = chunks[-1]
        text = b"".join(c.message for c in chunks).decode()
        s = self._check_logprobs(final.logprobs, final.tokens, text, 3, "stream final")
        check(
            [e["token"] for e in s] == [e["token"] for e in u],
            "streamed final logprobs differ from the unary ones",
        )
        partial = sum(1 for e in u if not e["token"])
        note = f" ({partial} partial-UTF-8 token(s) with empty token/bytes)" if partial else ""
        return (
            f"{len(u)} entries x top 3, OpenAI format, tokens spell the text{note}; "
            "stream final Reply covers the whole completion"
        )

    def _maybe_skip(self, e: grpc.RpcError, what: str) -> None:
        if e.code() in SKIP_CODES:
            raise Skip(f"{what}: {e.code().name}: {e.details()}") from None
        raise e

    def cap_embeddings(self) -> str:
        try:
            res = self.stub.Embedding(pb.PredictOptions(Embeddings=self.cfg.prompt), timeout=120)
        except grpc.RpcError as e:
            self._maybe_skip(e, "Embedding")
        check(res.embeddings and res.dim > 0, f"dim={res.dim}, {len(res.embeddings)} floats")
        if res.layout == pb.EMBEDDING_LAYOUT_PER_TOKEN:
            check(len(res.embeddings) == res.tokens * res.dim, "per-token layout size mismatch")
        else:
            check(len(res.embeddings) == res.dim, f"{len(res.embeddings)} floats for dim {res.dim}")
        return f"dim {res.dim}, layout {res.layout}"

    def cap_rerank(self) -> str:
        docs = [
            "Paris is the capital of France.",
            "Bananas are yellow.",
            "The Eiffel Tower is in Paris.",
        ]
        try:
            res = self.stub.Rerank(
                pb.RerankRequest(query="Where is the Eiffel Tower?", documents=docs, top_n=2),
                timeout=120,
            )
        except grpc.RpcError as e:
            self._maybe_skip(e, "Rerank")
        check(len(res.results) == 2, f"{len(res.results)} results for top_n=2")
        scores = [r.relevance_score for r in res.results]
        check(scores == sorted(scores, reverse=True), f"results not sorted: {scores}")
        check(all(docs[r.index] == r.text for r in res.results), "index/text mismatch")
        return f"top: {res.results[0].text!r}"

    def cap_score(self) -> str:
        try:
            res = self.stub.Score(
                pb.ScoreRequest(
                    prompt="The capital of France is", candidates=[" Paris", " a banana"]
                ),
                timeout=120,
            )
        except grpc.RpcError as e:
            self._maybe_skip(e, "Score")
        check(len(res.candidates) == 2, f"{len(res.candidates)} candidate scores for 2")
        for c in res.candidates:
            check(c.num_tokens > 0 and c.log_prob <= 0, f"bad candidate score {c}")
        return f"log_probs {[round(c.log_prob, 2) for c in res.candidates]}"

    def cap_cancel(self) -> str:
        """Cancel a stream the engine provably has not finished; the engine must drop it
        (the proof, shared with tests/integration/test_generation.py, is in
        engine_control). The worker's log shows the request reached vLLM when this
        harness started the worker (it logs with BACKEND_DEBUG_REQUESTS=1)."""
        if not self.worker_pid:
            raise Skip("cancel stops the engine core: the worker's pid is unknown")
        want = 1000
        if self.cfg.tiny:  # as long as the 2048-token context allows
            prompt_len = self.stub.TokenizeString(
                pb.PredictOptions(Prompt=self.cfg.prompt), timeout=30
            ).length
            want = min(2000, 2048 - prompt_len - 8)
        core = engine_control.engine_core_of(self.worker_pid)
        try:
            seen = engine_control.cancel_aborts_engine_request(
                self.stub,
                core,
                self.predict_request(Tokens=want, IgnoreEOS=True, CorrelationId="e2e-cancel"),
                log_path=self.worker.log_path if self.worker is not None else None,
                ready_within=CANCEL_READY_WITHIN,
            )
        except AssertionError as e:
            raise Failed(str(e)) from None
        after = self.stub.Predict(self.predict_request(Tokens=4), timeout=60)
        check(after.tokens > 0, "no generation after the cancel")
        return f"{seen}; next Predict fine"

    def cap_free(self) -> str:
        engines = engine_processes(self.worker_pid, unreaped=True) if self.worker_pid else []
        if self.worker_pid:
            check(engines, "no engine process before Free")
        result = self.stub.Free(pb.HealthMessage(), timeout=120)
        check(result.success, f"Free: {result.message}")
        state = self.status()
        check(
            state == pb.StatusResponse.UNINITIALIZED,
            f"Status after Free is {state_name(state)}, expected UNINITIALIZED",
        )
        alive, zombies = wait_gone(engines, timeout=30)
        check(not alive, f"engine processes still running after Free: {alive}")
        if self.worker_pid:
            left = engine_processes(self.worker_pid)
            check(
                not left,
                f"processes under the worker after Free: {[(p.pid, p.name()) for p in left]}",
            )
        try:
            self.stub.Predict(self.predict_request(Tokens=2), timeout=30)
            raise Failed("Predict after Free did not fail")
        except grpc.RpcError as e:
            check(
                e.code() == grpc.StatusCode.FAILED_PRECONDITION,
                f"Predict after Free: {e.code().name}",
            )
        self.loaded = False
        gone = (
            f"{len(engines)} engine process(es) gone"
            if self.worker_pid
            else "engine processes not checked (pid unknown)"
        )
        if self.worker_pid and zombies:
            gone += f" ({len(zombies)} exited, not yet reaped by their parent: {zombies})"
        return f"Status UNINITIALIZED, {gone}, Predict -> FAILED_PRECONDITION"

    # ---- driver -----------------------------------------------------------------

    def run(self) -> None:
        caps = self.cfg.caps
        info(
            f"model {self.cfg.model or '-'} "
            f"({'tiny, forced outputs' if self.cfg.tiny else 'real'}); "
            f"options {self.cfg.options}; caps {','.join(caps)}"
        )
        started = time.monotonic()
        try:
            took = self.connect()
        except Failed as e:
            self.record(Outcome("health", "FAIL", detail=str(e)))
            for name in caps:
                if name != "health":
                    self.record(
                        Outcome(name, "FAIL", detail="not run: the worker did not answer Health")
                    )
            return
        info(f"worker answered Health after {took:.1f}s")
        if "health" in caps:
            self.run_cap("health", self.cap_health)
        for name in caps:
            if name == "health":
                continue
            if name != "load" and "load" in caps and not self.loaded:
                self.record(Outcome(name, "FAIL", detail="not run: LoadModel failed"))
                continue
            self.run_cap(name, getattr(self, "cap_" + name.replace("-", "_")))
        info(f"capabilities took {time.monotonic() - started:.1f}s")

    def shutdown(self, interrupted: bool = False) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.worker is None:
            return
        started = time.monotonic()
        # Interrupted: do not keep the user waiting (a worker in the middle of
        # LoadModel only exits once its engine has started).
        left = self.worker.stop(grace=15.0 if interrupted else 40.0)
        ms = (time.monotonic() - started) * 1000
        code = self.worker.proc.returncode
        if code != 0 and not left:  # the worker stops its engine and exits 0 on SIGTERM
            left = [f"worker exited with {code} on SIGTERM, expected 0"]
        if left:
            self.record(Outcome("shutdown", "FAIL", detail="; ".join(left)))
        else:
            n = len(self.worker.seen)
            self.record(
                Outcome(
                    "shutdown",
                    "PASS",
                    ms,
                    f"SIGTERM: worker exited {code}, none of its {n} child process(es) left"
                    + (
                        f" (unreaped zombies: {self.worker.zombies})" if self.worker.zombies else ""
                    ),
                )
            )


def main() -> int:
    try:
        cfg = Config.from_env()
    except ConfigError as e:
        print(f"harness: {e}", file=sys.stderr)
        return 2
    h = Harness(cfg)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    try:
        h.run()
    except KeyboardInterrupt:
        interrupted = True
        print("# interrupted: stopping the worker", flush=True)
    except Exception as e:  # a harness bug: still report it and stop the worker
        h.record(Outcome("harness", "FAIL", detail=f"{type(e).__name__}: {e}"))
        traceback.print_exc()
    finally:
        # A second Ctrl-C must not leave the worker running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        h.shutdown(interrupted)
    passed = sum(r.status == "PASS" for r in h.results)
    failed = sum(r.status == "FAIL" for r in h.results)
    skipped = sum(r.status == "SKIP" for r in h.results)
    if failed and h.worker is not None:
        info(f"worker log: {h.worker.log_path}")
    elif h.worker is not None:
        with contextlib.suppress(OSError):
            h.worker.log_path.unlink()
    print(
        f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""),
        flush=True,
    )
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
