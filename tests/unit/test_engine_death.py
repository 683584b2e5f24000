"""backend/engine_death.py: which of vLLM's output-handler records an engine death
drops, and how the death's cause is named (issue 26). The real engine's side is
tests/reliability/test_clean_unload.py."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest
from vllm.v1.engine.exceptions import EngineDeadError

from backend import engine_death

LOGGER = "vllm.v1.engine.async_llm"


def _handler_failed(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    return logging.getLogger(LOGGER).makeRecord(
        LOGGER, logging.ERROR, "async_llm.py", 906, "AsyncLLM output_handler failed.", (), info
    )


@pytest.fixture
def records(caplog):
    engine_death.install()
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return caplog


def _emit(record: logging.LogRecord) -> None:
    logging.getLogger(LOGGER).handle(record)


def test_a_death_outside_a_stop_of_ours_drops_the_traceback(records):
    _emit(_handler_failed(EngineDeadError()))
    assert not [r for r in records.records if r.name == LOGGER]


def test_during_a_stop_of_ours_the_record_is_kept_to_show_a_broken_order(records):
    with engine_death.stopping():
        _emit(_handler_failed(EngineDeadError()))
    assert [r.msg for r in records.records if r.name == LOGGER] == [
        "AsyncLLM output_handler failed."
    ]


def test_any_other_failure_of_the_output_handler_is_kept(records):
    _emit(_handler_failed(ValueError("a bug in output processing")))
    assert len([r for r in records.records if r.name == LOGGER]) == 1


def _llm(*exitcodes):
    procs = [SimpleNamespace(pid=100 + i, exitcode=c) for i, c in enumerate(exitcodes)]
    manager = SimpleNamespace(processes=procs)
    return SimpleNamespace(
        engine_core=SimpleNamespace(resources=SimpleNamespace(engine_manager=manager))
    )


@pytest.mark.parametrize(
    ("exitcode", "words"),
    [
        (-9, "(pid 100) was killed by SIGKILL (as the kernel's OOM killer does)"),
        (-11, "(pid 100) was killed by SIGSEGV"),
        (1, "(pid 100) exited with code 1 (its own error, if any, is logged above)"),
        (None, "(pid 100) reported a fatal error (logged above)"),
    ],
)
def test_the_cause_is_named_from_the_core_process_exit_status(exitcode, words):
    assert words in engine_death.death_cause(_llm(exitcode))


def test_no_core_process_known_still_says_something():
    assert engine_death.death_cause(SimpleNamespace()) == "the engine core stopped answering"
