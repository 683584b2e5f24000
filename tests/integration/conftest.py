from __future__ import annotations

import pytest

from tests.conftest import Worker, tiny_load_options

# Parsers the chat tests rely on; the tiny model's tokenizer has their markers.
CHAT_OPTIONS = ("tool_parser:hermes", "reasoning_parser:qwen3")


@pytest.fixture(scope="session")
def loaded(worker: Worker, tiny_model_dir) -> Worker:
    """The session worker with the tiny model loaded (once: ~12 s engine start)."""
    result = worker.stub.LoadModel(tiny_load_options(tiny_model_dir, *CHAT_OPTIONS), timeout=300)
    assert result.success, f"{result.message}\n{worker.log_tail()}"
    return worker
