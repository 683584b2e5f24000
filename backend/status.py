"""Memory of the worker's process tree, for the Status RPC."""

from __future__ import annotations

import os

import psutil


def memory_usage() -> tuple[int, dict[str, int]]:
    """Resident bytes of this process and all its descendants (the engine
    core and its workers are child processes), with a per-process breakdown
    keyed `name:pid`."""
    me = psutil.Process(os.getpid())
    breakdown: dict[str, int] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            with proc.oneshot():
                breakdown[f"{proc.name()}:{proc.pid}"] = int(proc.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # exited while we looked: it holds no memory any more
    return sum(breakdown.values()), breakdown
