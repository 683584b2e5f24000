"""Process configuration: CLI flags over environment, defaults, the event loop choice."""

from __future__ import annotations

import pytest

from backend.config import DEFAULT_MAX_MESSAGE_BYTES, parse_config


def test_defaults():
    config = parse_config([], env={})
    assert config.addr == "127.0.0.1:50051"
    assert config.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    assert config.max_concurrent_requests == 0
    assert config.parent_watch is True
    assert config.exit_on_engine_death is False
    assert config.transport == "h2"
    assert config.drain_seconds == 0.0 and config.grace_seconds == 10.0


@pytest.mark.parametrize(
    ("raw", "watch"),
    [("", True), ("  ", True), ("0", False), ("off", False), ("No", False), ("TRUE", True)],
)
def test_switch_variables_share_one_vocabulary_and_empty_means_default(raw, watch):
    """An empty LOCALAI_BACKEND_PARENT_WATCH used to turn the watch off."""
    assert parse_config([], env={"LOCALAI_BACKEND_PARENT_WATCH": raw}).parent_watch is watch


def test_a_switch_variable_with_another_word_is_refused():
    with pytest.raises(SystemExit, match="BACKEND_EXIT_ON_ENGINE_DEATH='maybe'"):
        parse_config([], env={"BACKEND_EXIT_ON_ENGINE_DEATH": "maybe"})


def test_drain_and_grace_seconds():
    env = {"BACKEND_DRAIN_SECONDS": "7.5", "BACKEND_GRACE_SECONDS": "3"}
    config = parse_config([], env=env)
    assert (config.drain_seconds, config.grace_seconds) == (7.5, 3.0)
    assert parse_config(["--drain-seconds", "-1"], env={}).drain_seconds == 0.0


def test_connection_bounds():
    config = parse_config([], env={})
    assert (config.idle_connection_s, config.max_connections) == (300.0, 1024)
    env = {"BACKEND_IDLE_CONNECTION_S": "0.5", "BACKEND_MAX_CONNECTIONS": "0"}
    config = parse_config([], env=env)
    assert (config.idle_connection_s, config.max_connections) == (0.5, 0)


def test_cli_wins_over_environment():
    env = {"BACKEND_ADDR": "127.0.0.1:1", "BACKEND_MAX_CONCURRENT_REQUESTS": "3"}
    assert parse_config([], env=env).max_concurrent_requests == 3
    config = parse_config(["--addr=127.0.0.1:2", "--max-concurrent-requests", "5"], env=env)
    assert (config.addr, config.max_concurrent_requests) == ("127.0.0.1:2", 5)


def test_event_loop_is_uvloop_when_installed():
    import uvloop  # noqa: F401  (a vLLM dependency: installed with the venv)

    assert parse_config([], env={}).event_loop == "uvloop"
    assert parse_config(["--event-loop", "uvloop"], env={}).event_loop == "uvloop"


def test_event_loop_asyncio_by_env_or_flag():
    assert parse_config([], env={"BACKEND_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    assert (
        parse_config(["--event-loop=asyncio"], env={"BACKEND_EVENT_LOOP": "uvloop"}).event_loop
        == "asyncio"
    )


def test_unknown_event_loop_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--event-loop", "trio"], env={})
    assert "invalid choice" in capsys.readouterr().err


def test_uvloop_asked_for_but_missing_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_uvloop(name, *args, **kwargs):
        if name == "uvloop":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    with pytest.raises(SystemExit, match="uvloop is not installed"):
        parse_config(["--event-loop", "uvloop"], env={})
    assert parse_config([], env={}).event_loop == "asyncio", "auto falls back"
