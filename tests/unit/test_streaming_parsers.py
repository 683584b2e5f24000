"""OutputState over vLLM's real parsers (no engine): streamed == non-streamed.

Engine deltas are simulated by cutting the token ids into chunks of 1, 2, 3, 5
and 8 tokens and decoding the text each chunk adds, as vLLM's detokenizer does
(`tests/stream_driver.py`).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import vllm  # noqa: F401  (explicit: these tests use vLLM's real parsers)

from backend.output.state import OutputState
from tests.stream_driver import added_markers, parser_class, stream

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
PING = {
    "type": "function",
    "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}},
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

TEXTS = {
    "reasoning then call": "<think>\nI should call the tool.\n</think>\n\n" + CALL,
    "reasoning, text, call": "<think>\nhm\n</think>\n\nLet me check.\n\n" + CALL,
    "two parallel calls": "<think>\nboth\n</think>\n\n"
    + CALL
    + "\n"
    + CALL.replace("Paris", "Rome"),
    "parameterless call": (
        '<think>\nx\n</think>\n\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'
    ),
    "plain text": "<think>\nno tools needed\n</think>\n\nJust text, with {braces} and ünïcode.",
    "cut in reasoning": "<think>\nthe reasoning is cut here",
    "call without reasoning": "</think>\n\n" + CALL,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def request_():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER, PING], "stream": True}
    )


def _state(cls, tokenizer, req):
    def new():
        return cls(tokenizer, req.tools, chat_template_kwargs={}, model_config=None)

    prompt = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    return OutputState(new, req, markers=added_markers(tokenizer), prompt_token_ids=prompt)


def _stream(cls, tokenizer, req, text, size):
    ids = tokenizer.encode(text, add_special_tokens=False)
    return stream(_state(cls, tokenizer, req), tokenizer, ids, size)


def _whole(cls, tokenizer, req, text):
    state = _state(cls, tokenizer, req)
    return state.parse_whole(text, tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("parsers", [("hermes", "qwen3"), ("hermes", "deepseek_r1")])
@pytest.mark.parametrize("name", list(TEXTS))
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_streamed_pieces_concatenate_to_the_whole_text_result(
    tokenizer, request_, parsers, name, size
):
    cls = parser_class(tokenizer, *parsers)
    text = TEXTS[name]
    whole = _whole(cls, tokenizer, request_, text)
    streamed = _stream(cls, tokenizer, request_, text, size)
    assert streamed.reasoning == whole.reasoning
    assert streamed.content == whole.content
    assert [c.name for c in streamed.calls] == [c.name for c in whole.tool_calls]
    assert all(c.names_sent == 1 for c in streamed.calls), "a call's name is sent once"
    assert [json.loads(c.arguments) for c in streamed.calls] == [
        json.loads(c.arguments) for c in whole.tool_calls
    ]


def test_known_results_of_the_forced_texts(tokenizer, request_):
    cls = parser_class(tokenizer, "hermes", "qwen3")
    piece = _whole(cls, tokenizer, request_, TEXTS["two parallel calls"])
    assert piece.reasoning == "\nboth\n" and piece.content == ""
    assert [(c.index, c.name, json.loads(c.arguments)) for c in piece.tool_calls] == [
        (0, "get_weather", {"city": "Paris"}),
        (1, "get_weather", {"city": "Rome"}),
    ]
    assert all(c.id.startswith("chatcmpl-tool-") for c in piece.tool_calls)
    plain = _whole(cls, tokenizer, request_, TEXTS["plain text"])
    assert plain.content.strip() == "Just text, with {braces} and ünïcode." and not plain.tool_calls


def test_without_a_parser_everything_is_content(tokenizer):
    assert OutputState(None, None).feed("<think>a</think>", [1]).content == "<think>a</think>"
    assert OutputState(None, None).parse_whole("x<tool_call>", [1]).content == "x<tool_call>"


class _DisagreeingParser:
    """An engine-path parser whose stream has content its whole-text parse has not."""

    tool_parser = SimpleNamespace(engine_based_streaming=True, supports_required_and_named=False)
    reasoning_parser = None
    _engine_based = True

    def parse_delta(self, *, delta_text, **kwargs):
        return SimpleNamespace(content=delta_text, reasoning=None, tool_calls=None)

    def parse(self, text, request, **kwargs):
        return None, "abXY", None


def test_a_stream_that_diverged_from_the_whole_text_parse_is_logged(caplog):
    request = SimpleNamespace(tools=[WEATHER], tool_choice="auto")
    state = OutputState(_DisagreeingParser, request)
    assert state.path == "engine"
    assert state.feed("ab", [1]).content == "ab"
    assert state.feed("c", [2]).content == "c"
    with caplog.at_level("WARNING", logger="backend.output.state"):
        last = state.feed("d", [3], finished=True)
    # "abc" was sent; the whole-text result is "abXY": the rest after the
    # common prefix "ab" is sent, and the divergence is logged.
    assert last.content == "XY"
    assert "streamed content differs from the whole-text parse after 2 characters" in caplog.text
    warning = next(r for r in caplog.records if r.levelname == "WARNING")
    assert "abc" not in warning.getMessage(), "request content stays out of the warning"


def test_a_hermes_call_streams_its_name_then_its_arguments_as_they_are_generated(
    tokenizer, request_
):
    cls = parser_class(tokenizer, "hermes", "qwen3")
    state = _state(cls, tokenizer, request_)
    text = TEXTS["reasoning, text, call"]
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [
        state.feed(tokenizer.decode([i]), [i], finished=n == len(ids) - 1)
        for n, i in enumerate(ids)
    ]
    assert "".join(p.reasoning for p in pieces) == "\nhm\n", "reasoning streams as it comes"
    assert "".join(p.content for p in pieces) == "\n\nLet me check.\n\n"
    named = [n for n, p in enumerate(pieces) for c in p.tool_calls if c.name]
    assert len(named) == 1 and named[0] < len(pieces) - 5, "the name goes out once, early"
    (call,) = pieces[named[0]].tool_calls
    assert call.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    fragments = [c.arguments for p in pieces[named[0] :] for c in p.tool_calls if c.arguments]
    assert len(fragments) > 3, f"arguments stream in fragments: {fragments}"
    assert "".join(fragments) == '{"city": "Paris"}'
