"""Where a serving process's CPU per token goes, below Python: `perf` by shared
object and symbol, and its system calls per token (`python -m bench --perf S`).

py-spy (`--profile`) sees Python frames only, and counts a thread preempted
inside `send()` as busy. `perf record` (cpu-clock samples, 999 Hz, every thread
of the process) splits the process's CPU between the kernel (socket writes,
the loopback receive path they run, epoll), libpython (the interpreter running
Python code), uvloop, protobuf's upb, zmq, ...; `perf trace -s` counts its
system calls. Both are taken for each raw-workload target in turn (A, B, Bi, G)
while it runs the same workload in a loop; the shares are turned into µs per
token with the process's schedstat CPU over the same window.

Needs `perf` (linux-perf) and the right to attach to the process (root here).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FREQ = 999
_ROW = re.compile(r"^\s*([0-9.]+)%\s+(.*?)\s*$")
_SYSCALL = re.compile(r"^\s+([a-z_0-9]+)\s+(\d+)\s+(\d+)\s+([0-9.]+)\s")


def available() -> str | None:
    """Why `--perf` cannot run here, or None."""
    if shutil.which("perf") is None:
        return "perf not found (apt-get install linux-perf)"
    return None


def _report(data: Path, sort: str, limit: float) -> list[tuple[float, str]]:
    cmd = ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", sort]
    done = subprocess.run(
        [*cmd, "--percent-limit", str(limit)],
        capture_output=True,
        text=True,
        check=False,
    )
    rows = []
    for line in done.stdout.splitlines():
        if line.startswith("#"):
            continue
        m = _ROW.match(line)
        if m:
            rows.append((float(m.group(1)), " ".join(m.group(2).split())))
    return rows


def parse_trace_summary(text: str) -> dict[str, int]:
    """`perf trace -s` output → calls per system call, all threads summed."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        m = _SYSCALL.match(line)
        if m and m.group(1) != "syscall":
            calls[m.group(1)] = calls.get(m.group(1), 0) + int(m.group(2))
    return dict(sorted(calls.items(), key=lambda kv: -kv[1]))


def measure(
    pid: int,
    seconds: float,
    run_once: Callable[[], int],
    cpu_of: Callable[[int], float],
    out_dir: Path,
    label: str,
) -> dict[str, Any]:
    """`run_once()` runs the workload once and returns its output tokens;
    `cpu_of(pid)` is the process's CPU seconds (schedstat)."""
    data = out_dir / f"perf-{label}.data"
    rec = subprocess.Popen(
        ["perf", "record", "-F", str(FREQ), "-p", str(pid), "-o", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    cpu0, tokens, started = cpu_of(pid), 0, time.monotonic()
    while time.monotonic() - started < seconds:
        tokens += run_once()
    cpu = cpu_of(pid) - cpu0
    rec.send_signal(signal.SIGINT)
    rec.wait(60)
    us_per_tok = cpu / tokens * 1e6 if tokens else 0.0

    def per_tok(rows: list[tuple[float, str]]) -> list[dict[str, Any]]:
        return [{"what": w, "pct": p, "us_per_tok": p / 100.0 * us_per_tok} for p, w in rows]

    trace_file = out_dir / f"trace-{label}.txt"
    tracer = subprocess.Popen(
        ["perf", "trace", "-s", "-p", str(pid), "-o", str(trace_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    traced_tokens, started = 0, time.monotonic()
    while time.monotonic() - started < min(seconds, 5.0):
        traced_tokens += run_once()
    tracer.send_signal(signal.SIGINT)
    tracer.wait(60)
    calls = parse_trace_summary(trace_file.read_text()) if trace_file.exists() else {}
    return {
        "tokens": tokens,
        "cpu_us_per_tok": us_per_tok,
        "dso": per_tok(_report(data, "dso", 0.5)),
        "symbols": per_tok(_report(data, "dso,sym", 0.4)[:40]),
        "syscalls_per_tok": {
            k: v / traced_tokens
            for k, v in calls.items()
            if traced_tokens and v / traced_tokens > 0.01
        },
        "perf_data": str(data),
    }


def format_split(results: dict[str, dict[str, Any]], top: int = 14) -> str:
    lines = []
    for key, r in results.items():
        if "error" in r:
            lines.append(f"{key}: {r['error']}")
            continue
        lines.append(
            f"{key}: {r['cpu_us_per_tok']:.0f} µs/token of the serving process "
            f"({r['tokens']} tokens); by shared object:"
        )
        lines += [f"    {d['us_per_tok']:6.1f} µs  {d['what']}" for d in r["dso"][:8]]
        lines.append("  top symbols (self):")
        lines += [f"    {d['us_per_tok']:6.1f} µs  {d['what']}" for d in r["symbols"][:top]]
        calls = ", ".join(f"{k} {v:.2f}" for k, v in list(r["syscalls_per_tok"].items())[:10])
        lines.append(f"  system calls per token: {calls}")
    return "\n".join(lines)
