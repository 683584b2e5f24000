from __future__ import annotations

import pytest

from tests.conftest import Worker, tiny_load_options

# Parsers the chat tests rely on; the tiny model's tokenizer has their markers.
# Grammars must also hold inside the reasoning, since the tests force whole
# answers (`<think>…</think><tool_call>…`) on a model with random weights.
CHAT_OPTIONS = (
    "tool_parser:hermes",
    "reasoning_parser:qwen3",
    '--structured-outputs-config:{"enable_in_reasoning": true}',
)


@pytest.fixture(scope="session")
def loaded(worker: Worker, tiny_model_dir) -> Worker:
    """The session worker with the tiny model loaded (once: ~12 s engine start)."""
    result = worker.stub.LoadModel(tiny_load_options(tiny_model_dir, *CHAT_OPTIONS), timeout=300)
    assert result.success, f"{result.message}\n{worker.log_tail()}"
    return worker
