"""A stream shows every byte the moment it is certain, on the real engine (issue 22).

Forced outputs on the tiny model (hermes tool parser, qwen3 reasoning parser,
`<think>` and `<tool_call>` as added tokens that are not special). What the
worker holds back is measured without racing the engine: each streamed Reply
carries its own tokens' logprobs, so the test knows which tokens the engine
delivered with the last output (vLLM merges outputs a slow reader has not
taken yet, so that last output may be long on a loaded machine). Everything
before them must have reached the client before the final Reply, minus the
closing syntax of a call (`"}`) that waits for its end.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.chat_helpers import USER, WEATHER_TOOL, chat_request, collect

pytestmark = pytest.mark.integration

CLOSING = 3  # `"}}` of a call's arguments may wait for the end
LONG_CITY = (
    "Paris, capitale de la France, sur la Seine; 2 102 650 habitants en 2023, "
    'la Ville Lumi\u00e8re \u2014 "city of light" \u2014 and its 20 arrondissements'
)


def _stream(stub, req):
    req.Logprobs = 1
    return list(stub.PredictStream(req, timeout=120))


def _final_delta_text(replies) -> str:
    """The text of the tokens the engine delivered with its last output: the
    whole completion's logprob entries (final Reply) minus those of every chunk."""
    whole = json.loads(replies[-1].logprobs)["content"]
    streamed = sum(len(json.loads(r.logprobs)["content"]) for r in replies[:-1] if r.logprobs)
    return "".join(entry["token"] for entry in whole[streamed:])


def test_a_long_tool_call_streams_its_arguments_as_they_are_generated(loaded):
    args = {"city": LONG_CITY}
    forced = (
        "<think>\nLong call.\n</think>\n\n<tool_call>\n"
        + json.dumps({"name": "get_weather", "arguments": args})
        + "\n</tool_call>"
    )
    req = chat_request(loaded.stub, USER, forced=forced, tools=[WEATHER_TOOL], tokens=400)
    unary = collect([loaded.stub.Predict(req, timeout=120)])
    replies = _stream(loaded.stub, req)
    streamed = collect(replies)
    assert streamed.structured() == unary.structured()
    # the model wrote \u escapes; vLLM returns json.dumps(..., ensure_ascii=False)
    assert (
        streamed.calls[0].arguments
        == unary.calls[0].arguments
        == json.dumps(args, ensure_ascii=False)
    )
    before = collect(replies[:-1])
    call = before.calls.get(0)
    assert call is not None and call.name == "get_weather", "the name went out before the end"
    total = len(streamed.calls[0].arguments.encode())
    got = len(call.arguments.encode())
    last = len(_final_delta_text(replies).encode())
    print(f"\narguments: {got} of {total} bytes before the final Reply; last delta {last} bytes")
    assert got >= total - last - CLOSING, "arguments were held back beyond the last delta"


def test_an_answer_shaped_like_json_streams_while_tools_are_offered(loaded):
    answer = '{"answer": "Paris is the capital of France, and its largest city by far."}'
    req = chat_request(loaded.stub, USER, forced=answer, tools=[WEATHER_TOOL])
    req.Metadata["enable_thinking"] = "false"
    unary = collect([loaded.stub.Predict(req, timeout=120)])
    replies = _stream(loaded.stub, req)
    streamed = collect(replies)
    assert unary.content == streamed.content == answer and not streamed.calls
    before = len(collect(replies[:-1]).content.encode())
    last = len(_final_delta_text(replies).encode())
    print(f"\ncontent: {before} of {len(answer)} bytes before the final Reply; last delta {last}")
    assert before >= len(answer) - last, "a JSON-shaped answer was held back"


def test_reasoning_markers_as_added_tokens_never_stream_as_reasoning(loaded):
    # The case a checker outside the project found: <think> and </think> are
    # added tokens that are not special; the stream sent them as reasoning and
    # then repeated the reasoning in the final message.
    forced = (
        "<think>Need weather.</think><tool_call>\n"
        '{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>'
    )
    req = chat_request(loaded.stub, USER, forced=forced, tools=[WEATHER_TOOL])
    unary = collect([loaded.stub.Predict(req, timeout=120)])
    replies = _stream(loaded.stub, req)
    pieces = [d.reasoning_content for r in replies for d in r.chat_deltas if d.reasoning_content]
    assert not any("think>" in p for p in pieces), pieces
    streamed = collect(replies)
    assert streamed.reasoning == unary.reasoning == "Need weather."
    assert streamed.structured() == unary.structured()
    assert streamed.calls[0].arguments == '{"location": "Paris"}'


def test_predict_and_predict_stream_report_the_same_usage(loaded):
    req = chat_request(loaded.stub, USER, forced="<think>\nx\n</think>\n\nJust text.")
    unary = loaded.stub.Predict(req, timeout=120)
    final = list(loaded.stub.PredictStream(req, timeout=120))[-1]
    assert (unary.tokens, unary.prompt_tokens) == (final.tokens, final.prompt_tokens)
    assert unary.tokens > 5 and unary.prompt_tokens > 5
    for reply in (unary, final):
        assert reply.timing_prompt_processing > 0 and reply.timing_token_generation >= 0
