"""py-spy's raw (collapsed-stack) output → top frames by self and total time.

py-spy samples every thread of the process (`--threads` labels them) and, unless
`--idle`, drops threads it sees sleeping. Its idle test is not perfect (a thread
just woken from epoll but still waiting for a core shows as running in `select`),
so leaf frames that are waits are counted apart as "idle-like" and left out of the
busy tables.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

_LINE = re.compile(r":\d+\)$")
# The worker's entry frames: on every stack, never the innermost of interest.
_OUTER = ("main (backend/__main__.py)", "<module> (backend/__main__.py)", "serve (backend/")
# Leaf frames that are a thread waiting (the blocking C call is below them).
_IDLE_LEAVES = (
    "EpollSelector.select ",
    "_PollLikeSelector.select ",
    "select (selectors.py)",
    "Condition.wait ",
    "Event.wait ",
    "wait (multiprocessing/connection.py)",
    "_worker (concurrent/futures/thread.py)",
    "CoreEngineProcManager.monitor_engine_liveness ",
    "Thread.join ",
    "poll (",
    "Poller.poll ",
    "Socket.recv",
    "Queue.get ",
    "SocketIO.readinto ",  # bench.gcprobe's thread waiting for a snapshot request
    # A thread whose innermost Python frame is Thread.run runs a C target: here
    # grpc's completion-queue poller (_poll_wrapper), blocked in epoll_wait
    # nearly all the time (checked with --native).
    "Thread.run (threading.py)",
)


def _frame(frame: str) -> str:
    """`func (path/to/file.py:123)` → `func (file.py)` with a short path."""
    frame = _LINE.sub(")", frame.strip())
    m = re.match(r"^(.*) \((.*)\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    for marker in ("site-packages/", "/work/main/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3.":
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    return f"{func} ({path})"


# Native leaves (py-spy --native) of a thread that waits rather than runs.
_NATIVE_WAITS = (
    "epoll_wait",
    "poll (",
    "select (lib",
    "PyThread_acquire_lock_timed",
    "pthread_cond",
    "sem_wait",
    "take_gil",
    "nanosleep",
)


def _is_python(frame: str) -> bool:
    return ".py)" in frame or "<frozen" in frame


def _is_idle(names: list[str]) -> bool:
    """Idle-like: the innermost Python frame is a wait, or native code below it waits."""
    i = max((k for k, n in enumerate(names) if _is_python(n)), default=-1)
    if i >= 0 and any(p in names[i] for p in _IDLE_LEAVES):
        return True
    return any(n.startswith(_NATIVE_WAITS) for n in names[i + 1 :])


def _python_leaf(names: list[str]) -> str:
    return next((n for n in reversed(names) if _is_python(n)), names[-1])


def parse_collapsed(path: Path, top: int = 25) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    processes: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    idle: Counter[str] = Counter()
    py_self: Counter[str] = Counter()
    samples = busy = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        parts = stack.split(";")
        process = next((p for p in parts if p.startswith("process ")), "")
        thread = next((p for p in parts if p.startswith("thread ")), "thread ?")
        frames = [p for p in parts if not p.startswith(("process ", "thread "))]
        samples += count
        if not frames:
            continue
        names = [_frame(f) for f in frames]
        if _is_idle(names):
            idle[_python_leaf(names)] += count
            continue
        busy += count
        threads[f"{process[:60]} {thread}".strip()] += count
        if process:
            processes[process[:100]] += count
        self_time[names[-1]] += count
        py_self[_python_leaf(names)] += count
        for name in set(names):
            total_time[name] += count
        for name in reversed(names):  # innermost frame of our own code
            if "backend/" in name and not name.startswith(_OUTER):
                ours[name] += count
                break

    def pct(n: int) -> float:
        return round(100.0 * n / busy, 2) if busy else 0.0

    return {
        "samples": samples,
        "busy_samples": busy,
        "idle_like": [{"frame": f, "samples": n} for f, n in idle.most_common(8)],
        "processes": [{"process": p, "pct": pct(n)} for p, n in processes.most_common()],
        "threads": [{"thread": t, "pct": pct(n)} for t, n in threads.most_common()],
        "self": [{"frame": f, "pct": pct(n)} for f, n in self_time.most_common(top)],
        "self_python": [{"frame": f, "pct": pct(n)} for f, n in py_self.most_common(top)],
        "total": [{"frame": f, "pct": pct(n)} for f, n in total_time.most_common(top)],
        "ours_innermost": [{"frame": f, "pct": pct(n)} for f, n in ours.most_common(top)],
    }


def format_profile(p: dict[str, Any], top: int = 20) -> str:
    rate = p.get("rate") or 0
    seconds = p.get("seconds") or 0
    busy_share = 100.0 * p["busy_samples"] / (rate * seconds) if rate and seconds else 0.0
    lines = [
        f"profile (py-spy, {rate} Hz, {seconds:g} s): {p['busy_samples']} busy samples of the "
        f"worker's main process{' tree' if p.get('subprocesses') else ''} (≈{busy_share:.0f}% "
        f"of one core), {p['samples'] - p['busy_samples']} idle-like left out; "
        f"{p.get('rounds', '?')} rounds of {p.get('workload', {}).get('name', '?')} at "
        f"{p.get('tok_s_while_profiling') or 0:.0f} tok/s. % of busy samples:"
    ]
    if p["processes"]:
        procs = ", ".join(f"{e['process']} {e['pct']}%" for e in p["processes"])
        lines.append(f"  processes: {procs}")
    lines.append("  threads: " + ", ".join(f"{t['thread']} {t['pct']}%" for t in p["threads"][:6]))
    lines.append("  top frames by self time:")
    lines += [f"    {e['pct']:6.2f}%  {e['frame']}" for e in p["self"][:top]]
    if p.get("native"):
        lines.append("  top Python frames by self time (native frames folded into their caller):")
        lines += [f"    {e['pct']:6.2f}%  {e['frame']}" for e in p["self_python"][:top]]
    lines.append("  top frames by total (inclusive) time:")
    lines += [f"    {e['pct']:6.2f}%  {e['frame']}" for e in p["total"][:top]]
    lines.append("  innermost backend/ frame on the stack (rest: vLLM/grpc/asyncio only):")
    lines += [f"    {e['pct']:6.2f}%  {e['frame']}" for e in p["ours_innermost"][:10]]
    return "\n".join(lines)
