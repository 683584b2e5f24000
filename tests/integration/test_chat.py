"""Chat through the real worker: templates, tool calls and reasoning as ChatDelta.

The tiny model has random weights, so each test forces the model's answer
with a grammar; what is tested is everything around it: prompt rendering,
vLLM's parsers, streaming, and the reply format.
"""

from __future__ import annotations

import json
import threading

import grpc
import pytest

from backend.gen import backend_pb2 as pb
from tests.integration.chat_helpers import (
    CALL,
    STRICT_WEATHER_TOOL,
    TIME_TOOL,
    TOOL_HISTORY,
    USER,
    WEATHER_TOOL,
    chat_request,
    collect,
    whitespace_bias,
)

pytestmark = pytest.mark.integration

THINK_THEN_CALL = "<think>\nI should call the tool.\n</think>\n\n" + CALL % "Paris"


def both(stub, req):
    """(non-streamed, streamed) results of the same request."""
    return collect([stub.Predict(req, timeout=120)]), collect(stub.PredictStream(req, timeout=120))


def test_reasoning_and_tool_call_come_out_structured_streamed_and_not(loaded):
    unary, streamed = both(
        loaded.stub, chat_request(loaded.stub, USER, forced=THINK_THEN_CALL, tools=[WEATHER_TOOL])
    )
    expected = {
        "content": "",
        "reasoning": "\nI should call the tool.\n",
        "calls": [("get_weather", {"city": "Paris"})],
    }
    assert unary.structured() == expected
    assert streamed.structured() == expected
    assert streamed.replies > 5, "streamed as deltas"
    call = streamed.calls[0]
    assert call.name_deltas == 1 and call.id.startswith("chatcmpl-tool-")
    assert unary.calls[0].id.startswith("chatcmpl-tool-")
    assert streamed.message == streamed.content == "", "Reply.message carries content only"


def test_two_parallel_tool_calls(loaded):
    forced = "<think>\nTwo cities.\n</think>\n\n" + CALL % "Paris" + "\n" + CALL % "Rome"
    unary, streamed = both(
        loaded.stub, chat_request(loaded.stub, USER, forced=forced, tools=[WEATHER_TOOL])
    )
    expected = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert unary.structured()["calls"] == expected
    assert streamed.structured()["calls"] == expected
    assert sorted(streamed.calls) == [0, 1]
    assert streamed.calls[0].id != streamed.calls[1].id


def test_parameterless_tool_gets_empty_object_arguments(loaded):
    forced = (
        '<think>\nx\n</think>\n\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    unary, streamed = both(
        loaded.stub, chat_request(loaded.stub, USER, forced=forced, tools=[TIME_TOOL])
    )
    assert unary.structured()["calls"] == [("get_time", {})]
    assert streamed.structured()["calls"] == [("get_time", {})]


def test_plain_text_with_tool_parser_active_calls_nothing(loaded):
    forced = "<think>\nNo tool needed.\n</think>\n\nIt is sunny, {probably}."
    unary, streamed = both(
        loaded.stub, chat_request(loaded.stub, USER, forced=forced, tools=[WEATHER_TOOL])
    )
    assert unary.structured() == streamed.structured()
    assert unary.content.strip() == "It is sunny, {probably}."
    assert unary.reasoning == "\nNo tool needed.\n"
    assert not unary.calls
    assert unary.message == unary.content and streamed.message == streamed.content


def test_thinking_disabled_gives_content_without_reasoning(loaded):
    req = chat_request(
        loaded.stub, USER, forced="Hello there.", metadata={"enable_thinking": "false"}
    )
    unary, streamed = both(loaded.stub, req)
    assert (
        unary.structured()
        == streamed.structured()
        == {"content": "Hello there.", "reasoning": "", "calls": []}
    )


def test_output_cut_by_tokens_inside_reasoning(loaded):
    forced = "<think>\n" + "step " * 50 + "\n</think>\n\nDone."
    unary, streamed = both(loaded.stub, chat_request(loaded.stub, USER, forced=forced, tokens=8))
    assert unary.tokens == streamed.tokens == 8
    assert unary.structured() == streamed.structured()
    assert unary.reasoning.startswith("\nstep") and unary.content == ""


def test_tool_call_after_reasoning_with_prior_conversation(loaded):
    unary, streamed = both(
        loaded.stub,
        chat_request(loaded.stub, TOOL_HISTORY, forced=THINK_THEN_CALL, tools=[WEATHER_TOOL]),
    )
    assert unary.structured() == streamed.structured()
    assert unary.structured()["calls"] == [("get_weather", {"city": "Paris"})]


def test_named_tool_choice_constrains_the_output_to_that_call(loaded, tiny_model_dir):
    req = chat_request(
        loaded.stub,
        USER,
        tools=[STRICT_WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        tokens=100,
        LogitBias=json.dumps(whitespace_bias(tiny_model_dir)),
    )
    req.Metadata["enable_thinking"] = "false"
    unary, streamed = both(loaded.stub, req)
    assert unary.structured()["calls"] == [("get_weather", {"city": "Paris"})]
    assert streamed.structured()["calls"] == [("get_weather", {"city": "Paris"})]


def test_tool_choice_none_parses_no_calls(loaded):
    forced = "<think>\nx\n</think>\n\n" + CALL % "Paris"
    req = chat_request(loaded.stub, USER, forced=forced, tools=[WEATHER_TOOL], tool_choice="none")
    unary, streamed = both(loaded.stub, req)
    assert not unary.calls and not streamed.calls
    assert unary.structured() == streamed.structured()


def test_json_schema_grammar_gives_json_content(loaded, tiny_model_dir):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    req = chat_request(
        loaded.stub,
        USER,
        metadata={"enable_thinking": "false"},
        tokens=50,
        LogitBias=json.dumps(whitespace_bias(tiny_model_dir)),
    )
    req.Grammar = json.dumps(schema)
    reply = collect([loaded.stub.Predict(req, timeout=120)])
    assert json.loads(reply.content)["answer"] in ("yes", "no")


def test_chat_logprobs_cover_every_token(loaded):
    req = chat_request(
        loaded.stub,
        USER,
        forced="Hello there.",
        metadata={"enable_thinking": "false"},
        Logprobs=1,
        TopLogprobs=2,
    )
    chunks = list(loaded.stub.PredictStream(req, timeout=120))
    final = json.loads(chunks[-1].logprobs)
    assert len(final["content"]) == chunks[-1].tokens
    assert all(len(e["top_logprobs"]) == 2 for e in final["content"])


def test_concurrent_chat_streams_do_not_share_parser_state(loaded):
    cities = ["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Quito"]
    results: dict[str, dict] = {}

    def run(city: str) -> None:
        forced = f"<think>\nFor {city}.\n</think>\n\n" + CALL % city
        req = chat_request(loaded.stub, USER, forced=forced, tools=[WEATHER_TOOL])
        results[city] = collect(loaded.stub.PredictStream(req, timeout=180)).structured()

    threads = [threading.Thread(target=run, args=(c,)) for c in cities]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for city in cities:
        assert results[city] == {
            "content": "",
            "reasoning": f"\nFor {city}.\n",
            "calls": [("get_weather", {"city": city})],
        }


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (dict(Tools="[{"), "Tools is not valid JSON"),
        (dict(Tools='[{"type": "function"}]'), "Tools[0]"),
        (
            dict(Messages=[pb.Message(role="assistant", tool_calls="{oops")]),
            "tool_calls is not valid JSON",
        ),
        (dict(Messages=[pb.Message(role="wizard", content="x")]), "role"),
        (dict(Messages=[]), "Messages is empty"),
        (
            dict(
                Grammar="root ::= (((",
            ),
            "grammar",
        ),
        (dict(Grammar='{"type": "object"'), "JSON schema"),
        (dict(Metadata={"chat_template_kwargs": "[1]"}), "chat_template_kwargs"),
        (dict(ToolChoice='"sometimes"'), "ToolChoice"),
        (dict(Images=["!!not base64"]), "Images[0] is not valid base64"),
    ],
)
def test_bad_chat_requests_are_invalid_argument(loaded, change, fragment):
    req = chat_request(loaded.stub, USER, tools=[WEATHER_TOOL], tokens=4)
    for key, value in change.items():
        if key == "Metadata":
            req.Metadata.clear()
            req.Metadata.update(value)
        elif key in ("Messages", "Images"):
            req.ClearField(key)
            getattr(req, key).extend(value)
        else:
            setattr(req, key, value)
    with pytest.raises(grpc.RpcError) as err:
        loaded.stub.Predict(req, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert fragment.lower() in err.value.details().lower()


def test_an_image_for_a_text_only_model_is_invalid_argument(loaded):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    req = chat_request(loaded.stub, USER, tokens=4)
    req.Images.append(base64.b64encode(buf.getvalue()).decode())
    with pytest.raises(grpc.RpcError) as err:
        loaded.stub.Predict(req, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    raw = pb.PredictOptions(
        Prompt="x", Tokens=2, Images=[base64.b64encode(buf.getvalue()).decode()]
    )
    with pytest.raises(grpc.RpcError) as err:
        loaded.stub.Predict(raw, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "takes no images" in err.value.details()
