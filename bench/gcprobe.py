"""`--gc-probe`: time the cyclic garbage collector's pauses in a measured process.

A full (generation 2) collection walks every tracked object: with vLLM, torch
and transformers imported that is ~600k objects and a 100-300 ms stop of the
event loop, i.e. of every stream. `gc.callbacks` gives each collection's
duration; the probe keeps counts, total and the gen-2 pauses.

The worker is run through `python -m bench.gcprobe --fd N --addr …`, which
installs the probe, answers snapshots on the control socket from a thread, and
then runs `backend.__main__.main` unchanged. Without `--gc-probe` the bench
starts `python -m backend` itself and nothing of this runs.
"""

from __future__ import annotations

import gc
import json
import socket
import sys
import threading
import time
from typing import Any


class GcProbe:
    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total = [0.0, 0.0, 0.0]
        self.full_pauses: list[float] = []
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        gen = info["generation"]
        self.count[gen] += 1
        self.total[gen] += took
        if gen == 2:
            self.full_pauses.append(took)

    def install(self) -> GcProbe:
        gc.callbacks.append(self._callback)
        return self

    def snapshot(self) -> dict[str, Any]:
        return {
            "count": list(self.count),
            "total_s": list(self.total),
            "full_pauses_s": list(self.full_pauses),
            "frozen": gc.get_freeze_count(),
        }


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What happened between two snapshots."""
    pauses = after["full_pauses_s"][len(before["full_pauses_s"]) :]
    return {
        "collections": [a - b for a, b in zip(after["count"], before["count"], strict=True)],
        "pause_ms": [
            round((a - b) * 1000.0, 3)
            for a, b in zip(after["total_s"], before["total_s"], strict=True)
        ],
        "full_pauses_ms": [round(p * 1000.0, 2) for p in pauses],
        "frozen_objects": after["frozen"],
    }


def _serve(sock: socket.socket, probe: GcProbe) -> None:
    """Answer each line received with a JSON snapshot (blocking: no CPU while idle)."""
    reader = sock.makefile("rb")
    for _ in reader:
        sock.sendall(json.dumps(probe.snapshot()).encode() + b"\n")


def main() -> None:
    argv = sys.argv[1:]
    i = argv.index("--fd")
    fd = int(argv[i + 1])
    del argv[i : i + 2]
    probe = GcProbe().install()
    threading.Thread(
        target=_serve, args=(socket.socket(fileno=fd), probe), name="gc-probe", daemon=True
    ).start()
    from backend.__main__ import main as worker_main

    worker_main(argv)


if __name__ == "__main__":  # vLLM's spawned processes re-import __main__
    main()
