import json
from dataclasses import dataclass, field

import pytest

from backend.errors import InvalidArgument
from backend.prompts import (
    chat_input,
    convert_messages,
    parse_tool_choice,
    parse_tools,
    template_kwargs,
)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
]


@dataclass
class Msg:
    role: str = "user"
    content: str = ""
    name: str = ""
    tool_call_id: str = ""
    reasoning_content: str = ""
    tool_calls: str = ""


@dataclass
class Req:
    Messages: list = field(default_factory=list)
    Tools: str = ""
    ToolChoice: str = ""
    Metadata: dict = field(default_factory=dict)


def test_messages_keep_every_field_and_decode_tool_call_arguments():
    calls = [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
        }
    ]
    out = convert_messages(
        [
            Msg("system", "be brief"),
            Msg("user", "weather?", name="bob"),
            Msg("assistant", "", reasoning_content="thinking", tool_calls=json.dumps(calls)),
            Msg("tool", '{"temp": 20}', tool_call_id="c1"),
        ]
    )
    assert out[0] == {"role": "system", "content": "be brief"}
    assert out[1]["name"] == "bob"
    assert out[2]["reasoning_content"] == "thinking"
    # Kept as the JSON string: vLLM's renderer decodes it for the template.
    assert json.loads(out[2]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert out[3]["tool_call_id"] == "c1"


def test_parameterless_call_with_empty_arguments_becomes_empty_object():
    calls = [{"id": "c", "function": {"name": "ping", "arguments": ""}}]
    out = convert_messages([Msg("assistant", tool_calls=json.dumps(calls))])
    assert out[0]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert out[0]["tool_calls"][0]["type"] == "function"


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        (Msg("wizard", "x"), "role"),
        (Msg("assistant", tool_calls="[{"), "tool_calls is not valid JSON"),
        (Msg("assistant", tool_calls='{"a": 1}'), "must be a JSON array"),
        (Msg("assistant", tool_calls='[{"function": {}}]'), "function.name"),
        (
            Msg("assistant", tool_calls='[{"function": {"name": "f", "arguments": "{bad"}}]'),
            "arguments",
        ),
        (Msg("user", tool_calls="[]"), "only assistant"),
    ],
)
def test_bad_messages_are_rejected_with_the_message_index(message, fragment):
    with pytest.raises(InvalidArgument, match=fragment) as err:
        convert_messages([Msg("user", "hi"), message])
    assert "Messages[1]" in str(err.value)


def test_empty_messages_with_template_is_an_error():
    with pytest.raises(InvalidArgument, match="Messages is empty"):
        convert_messages([])


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("[{", "Tools is not valid JSON"),
        ('{"a": 1}', "JSON array"),
        ('[{"type": "function"}]', "Tools\\[0\\]"),
        ('[{"type": "retrieval", "function": {"name": "f"}}]', "type must be"),
        ('[{"function": {"name": "f", "parameters": 3}}]', "parameters"),
    ],
)
def test_bad_tools_are_rejected(raw, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        parse_tools(raw)


@pytest.mark.parametrize(
    ("raw", "mode", "name"),
    [
        ("", "auto", None),
        ('"auto"', "auto", None),
        ("none", "none", None),
        ('"required"', "required", None),
        ('{"type": "function", "function": {"name": "get_weather"}}', "function", "get_weather"),
    ],
)
def test_tool_choice_forms(raw, mode, name):
    choice = parse_tool_choice(raw, TOOLS)
    assert (choice.mode, choice.name) == (mode, name)


@pytest.mark.parametrize(
    ("raw", "tools", "fragment"),
    [
        ('"sometimes"', TOOLS, "must be none"),
        ('{"function": {"name": "nope"}}', TOOLS, "not in Tools"),
        ('"required"', None, "no Tools"),
        ("{bad", TOOLS, "ToolChoice is not valid JSON"),
        ("3", TOOLS, "must be none"),
    ],
)
def test_bad_tool_choice_is_rejected(raw, tools, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        parse_tool_choice(raw, tools)


def test_thinking_flag_and_template_kwargs_from_metadata():
    kwargs, skip = template_kwargs(
        {"enable_thinking": "false", "chat_template_kwargs": '{"enable_thinking": true, "x": 1}'}
    )
    assert kwargs == {"enable_thinking": False, "x": 1}
    assert skip is None
    assert template_kwargs({"skip_special_tokens": "true"})[1] is True
    with pytest.raises(InvalidArgument, match="enable_thinking"):
        template_kwargs({"enable_thinking": "perhaps"})
    with pytest.raises(InvalidArgument, match="chat_template_kwargs"):
        template_kwargs({"chat_template_kwargs": "[1]"})


def test_chat_input_keeps_tools_and_choice_together():
    ci = chat_input([Msg("user", "hi")], json.dumps(TOOLS), "none", {})
    assert ci.tools == TOOLS and ci.tool_choice.mode == "none"


def test_a_predict_request_is_decoded_once_into_a_frozen_value():
    from backend.gen import backend_pb2 as pb
    from backend.request import GenerationRequest

    request = pb.PredictOptions(
        UseTokenizerTemplate=True,
        Messages=[pb.Message(role="user", content="hi")],
        Tools=json.dumps(TOOLS),
        ToolChoice="none",
        Grammar='{"type": "object"}',
        TopLogprobs=2,
        Tokens=5,
        Metadata={"lora_adapter": " b "},
        ModelIdentity="m",
    )
    req = GenerationRequest.from_proto(request, stream=True)
    assert req.chat is not None and req.chat.tools == TOOLS and req.prompt == ""
    assert req.structured_outputs == {"json": {"type": "object"}}
    assert "structured_outputs" not in req.sampling and req.sampling["max_tokens"] == 5
    assert (req.top_logprobs, req.lora, req.identity, req.stream) == (2, "b", "m", True)
    with pytest.raises(AttributeError):
        req.prompt = "x"  # type: ignore[misc]
    with pytest.raises(InvalidArgument, match="Prompt is empty"):
        GenerationRequest.from_proto(pb.PredictOptions(), stream=False)
