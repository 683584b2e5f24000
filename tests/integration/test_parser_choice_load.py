"""Parser choice through the real worker: decided before the engine starts.

The tiny model (hermes/qwen3 markers, no `<|python_tag|>`) is served under a
Llama-3-looking name, so the family table guesses llama3_json.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from tests.conftest import Worker, retire, tiny_load_options

PLUGIN = """
from vllm.tool_parsers import ToolParserManager
from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser


@ToolParserManager.register_module("integration_plugin_parser")
class PluginParser(Hermes2ProToolParser):
    pass
"""


@pytest.fixture
def fresh():
    w = Worker()
    yield w
    retire(w)


@pytest.fixture
def llama3_named(tiny_model_dir, tmp_path) -> Path:
    model = tmp_path / "Meta-Llama-3.1-tiny-Instruct"
    model.mkdir()
    for f in Path(tiny_model_dir).iterdir():
        os.symlink(f, model / f.name)
    return model


def _engine_started(worker: Worker) -> bool:
    """The worker logs `loading <model>: ...` right before it starts an engine;
    the engine core runs in a child process."""
    children = [
        p
        for p in psutil.Process(worker.proc.pid).children(recursive=True)
        if "resource_tracker" not in " ".join(p.cmdline())
    ]
    return bool(children) or "loading " in worker.log_tail(400)


def test_guess_that_does_not_fit_is_skipped_and_explicit_one_fails_before_the_engine(
    fresh, llama3_named
):
    from backend.gen import backend_pb2 as pb

    result = fresh.stub.LoadModel(
        tiny_load_options(llama3_named, "tool_parser:llama3_json"), timeout=300
    )
    assert not result.success
    assert "llama3_json" in result.message and "python_tag" in result.message, result.message
    assert not _engine_started(fresh), "an impossible explicit parser must fail before the engine"

    result = fresh.stub.LoadModel(tiny_load_options(llama3_named), timeout=300)
    assert result.success, f"{result.message}\n{fresh.log_tail()}"
    assert "tool parser none" in result.message
    log = fresh.log_tail(400)
    assert "tool parser llama3_json (family 'llama-3') skipped" in log
    assert "python_tag" in log
    reply = fresh.stub.Predict(
        pb.PredictOptions(
            UseTokenizerTemplate=True,
            Messages=[pb.Message(role="user", content="hi")],
            Tokens=4,
            IgnoreEOS=True,
        ),
        timeout=120,
    )
    assert reply.tokens == 4


def test_tool_parser_plugin_is_loaded_before_the_name_is_checked(fresh, tiny_model_dir, tmp_path):
    plugin = tmp_path / "integration_plugin_parser.py"
    plugin.write_text(PLUGIN)
    missing = fresh.stub.LoadModel(
        tiny_load_options(
            tiny_model_dir,
            f"tool_parser_plugin:{tmp_path / 'absent.py'}",
            "tool_parser:integration_plugin_parser",
        ),
        timeout=300,
    )
    assert not missing.success and "no such file" in missing.message
    assert not _engine_started(fresh)
    result = fresh.stub.LoadModel(
        tiny_load_options(
            tiny_model_dir,
            f"tool_parser_plugin:{plugin}",
            "tool_parser:integration_plugin_parser",
        ),
        timeout=300,
    )
    assert result.success, f"{result.message}\n{fresh.log_tail()}"
    assert "tool parser integration_plugin_parser" in result.message
