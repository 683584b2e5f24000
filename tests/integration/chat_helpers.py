"""Building forced-output chat requests and reading structured replies back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from backend.gen import backend_pb2 as pb
from tools.forcing import TAGS, WEATHER_TOOL, gbnf_literal, tag_bias

__all__ = ["TAGS", "WEATHER_TOOL", "gbnf_literal", "tag_bias"]

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>'
# A conversation that already called get_weather once (assistant tool_calls as
# the gateway sends them: a JSON string, arguments as a JSON string), then asks again.
TOOL_HISTORY = [
    {"role": "system", "content": "You call tools."},
    {"role": "user", "content": "Weather in Rome?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Call it.",
        "tool_calls": json.dumps(
            [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                }
            ]
        ),
    },
    {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"},
    *USER,
]

# get_weather whose only valid call is {"city": "Paris"} (strict schema): what a
# named tool_choice must produce.
STRICT_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}

TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time",
        "parameters": {"type": "object", "properties": {}},
    },
}


def whitespace_bias(model_dir) -> dict[str, int]:
    """-100 for every whitespace-only token. A random-weight model under a JSON
    grammar tends to fill the allowed inter-token whitespace forever; this
    makes it write compact JSON instead (literal text the grammar forces is
    still produced: masked-out alternatives are -inf)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return {str(i): -100 for i in range(len(tok)) if tok.decode([i]).isspace()}


def chat_request(
    stub,
    messages,
    *,
    forced: str | None = None,
    tools=None,
    tool_choice=None,
    metadata=None,
    tokens: int = 200,
    **kw,
) -> pb.PredictOptions:
    req = pb.PredictOptions(
        UseTokenizerTemplate=True,
        Messages=[pb.Message(**m) for m in messages],
        Tokens=tokens,
        Temperature=0.0,
        Metadata=metadata or {},
        **kw,
    )
    if forced is not None:
        req.Grammar = gbnf_literal(forced)
        req.LogitBias = tag_bias(stub)
    if tools is not None:
        req.Tools = json.dumps(tools)
    if tool_choice is not None:
        req.ToolChoice = json.dumps(tool_choice)
    return req


@dataclass
class Call:
    id: str = ""
    name: str = ""
    arguments: str = ""
    name_deltas: int = 0


@dataclass
class ChatResult:
    content: str = ""
    reasoning: str = ""
    message: str = ""
    calls: dict[int, Call] = field(default_factory=dict)
    replies: int = 0
    tokens: int = 0

    def structured(self) -> dict:
        """What a user compares: the text parts and each call's decoded arguments."""
        return {
            "content": self.content,
            "reasoning": self.reasoning,
            "calls": [
                (c.name, json.loads(c.arguments) if c.arguments else None)
                for _, c in sorted(self.calls.items())
            ],
        }


def collect(replies) -> ChatResult:
    """Accumulate replies exactly as the gateway does (concatenate per field / call index)."""
    out = ChatResult()
    for r in replies:
        out.replies += 1
        out.message += r.message.decode()
        if r.tokens:
            out.tokens = r.tokens
        for d in r.chat_deltas:
            out.content += d.content
            out.reasoning += d.reasoning_content
            for t in d.tool_calls:
                call = out.calls.setdefault(t.index, Call())
                if t.name:
                    call.name_deltas += 1
                    call.name = t.name
                if t.id:
                    call.id = t.id
                call.arguments += t.arguments
    return out
