"""An engine death, told apart from a stop of ours and reported once, with its cause.

When the engine core dies (the OOM killer, a segfault, `kill -9`), vLLM's
output handler logs "AsyncLLM output_handler failed." with an EngineDeadError
traceback whose only message is "See stack trace (above) for the root cause" —
and the watcher (`BackendServicer.watch_engine`) then says the engine died. Two
ERRORs for one event, the traceback telling nothing; a core that failed on its
own has logged its real traceback already, in its own process. So that record
is dropped and the watcher's one ERROR names the cause (`death_cause`).

During a stop of ours (Free, LoadModel, shutdown) the output handler is stopped
before the core (`Engine.shutdown`), so that record cannot appear: if it ever
does, the order broke, and it is kept for everyone to see.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

# Engines being stopped by us right now (Engine.shutdown): their end is no death.
_stopping = 0

_HANDLER_LOGGER = "vllm.v1.engine.async_llm"
_HANDLER_FAILED = "AsyncLLM output_handler failed."


class stopping:
    """`with stopping():` around a stop of ours."""

    def __enter__(self) -> None:
        global _stopping
        _stopping += 1

    def __exit__(self, *exc: object) -> None:
        global _stopping
        _stopping -= 1


def _is_death_record(record: logging.LogRecord) -> bool:
    if record.msg != _HANDLER_FAILED or not record.exc_info:
        return False
    exc = record.exc_info[1]
    # By name, as backend/errors.py does: vLLM moves classes between modules.
    return exc is not None and any(cls.__name__ == "EngineDeadError" for cls in type(exc).__mro__)


class _DeathTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _stopping or not _is_death_record(record):
            return True
        logging.getLogger(__name__).debug("vLLM's output handler saw the engine core die")
        return False


_filter = _DeathTraceback()


def install() -> None:
    """Drop vLLM's uninformative death traceback (idempotent)."""
    logging.getLogger(_HANDLER_LOGGER).addFilter(_filter)


def death_cause(llm: Any) -> str:
    """What ended the engine core, from its process's exit status."""
    resources = getattr(getattr(llm, "engine_core", None), "resources", None)
    manager = getattr(resources, "engine_manager", None)
    procs = list(getattr(manager, "processes", None) or ())
    parts = []
    for proc in procs:
        code = proc.exitcode
        if code is None:
            parts.append(f"its engine core (pid {proc.pid}) reported a fatal error (logged above)")
        elif code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (as the kernel's OOM killer does)" if name == "SIGKILL" else ""
            parts.append(f"its engine core (pid {proc.pid}) was killed by {name}{hint}")
        else:
            parts.append(
                f"its engine core (pid {proc.pid}) exited with code {code} "
                "(its own error, if any, is logged above)"
            )
    return "; ".join(parts) or "the engine core stopped answering"
