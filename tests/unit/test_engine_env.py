"""backend/start_settings.py's `construct`: Threads' binding is in the environment while
vLLM starts the engine (its core inherits it then) and gone after, so the next
LoadModel without Threads gets vLLM's own binding. vLLM's constructor is replaced
by a recorder: what is tested is the environment around it."""

from __future__ import annotations

import os

import pytest

from backend import start_settings
from backend.gateway_settings import THREADS_ENV


@pytest.fixture
def seen(monkeypatch):
    seen: list[str | None] = []

    def from_engine_args(args):
        seen.append(os.environ.get(THREADS_ENV))
        if args == "fail":
            raise RuntimeError("engine start failed")
        return "llm"

    monkeypatch.setattr(start_settings.AsyncLLM, "from_engine_args", from_engine_args)
    return seen


def test_the_binding_is_set_during_the_start_and_removed_after(seen, monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert start_settings.construct("args", {THREADS_ENV: "0,1"}) == "llm"
    assert seen == ["0,1"]
    assert THREADS_ENV not in os.environ


def test_an_earlier_value_comes_back_even_when_the_start_fails(seen, monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "auto")
    with pytest.raises(RuntimeError):
        start_settings.construct("fail", {THREADS_ENV: "1"})
    assert seen == ["1"]
    assert os.environ[THREADS_ENV] == "auto"
