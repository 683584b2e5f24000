"""Hold vLLM's engine-stop thread where issue 26's race opens, in a worker under test.

Imported at interpreter start-up when this directory is on PYTHONPATH (Python's
`sitecustomize` hook); it acts only if SHUTDOWN_HOLD_S is set, and only once
`vllm.v1.engine.core_client` is imported (other Python processes that inherit
the environment, such as multiprocessing's resource tracker, never import vLLM
and are left alone).

The race: `AsyncLLM.shutdown()` runs in a thread; it stops the engine core, then
`BackgroundResources.__call__` asks the event loop to close the core's sockets
and cancel the task reading them (which hands an EngineDeadError to the output
handler), and only after that asks the loop to cancel the output handler. If the
loop runs in between, the handler takes the EngineDeadError for a death and logs
a traceback. Whether it does depends on thread scheduling: `make demo` hit it at
its model switch, a test loop on the tiny model did not in 3 stops. Here the
stopping thread sleeps SHUTDOWN_HOLD_S right after `BackgroundResources.__call__`,
as a preempted thread would, so the loop always runs in between: the ordering
that produced the traceback happens at every stop, on purpose. Each hold prints
a line, so the test can check it happened.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import threading
import time

HOLD_S = float(os.environ.get("SHUTDOWN_HOLD_S") or 0)
TARGET = "vllm.v1.engine.core_client"
HELD = "shutdown hold: engine client resources released; this thread sleeps"


def _patch(module) -> None:
    resources = module.BackgroundResources
    original = resources.__call__

    def held(self) -> None:
        original(self)
        print(f"{HELD} {HOLD_S}s ({threading.current_thread().name})", flush=True)
        time.sleep(HOLD_S)

    resources.__call__ = held


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                _patch(module)

        spec.loader = _Loader()
        return spec


if HOLD_S > 0:
    sys.meta_path.insert(0, _Finder())
