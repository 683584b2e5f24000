"""Chat request (Messages, Tools, ToolChoice, Metadata) → chat-template input.

Pure conversion and validation; the engine module renders the result with
vLLM's own renderer (the same path vLLM's OpenAI server takes), so templates
see exactly what they would see behind `vllm serve`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from backend import peer_json
from backend.errors import InvalidArgument
from backend.switches import switch

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class MessageLike(Protocol):
    role: str
    content: str
    name: str
    tool_call_id: str
    reasoning_content: str
    tool_calls: str


@dataclass
class ToolChoice:
    """`none` | `auto` | `required` | a named function (`name` set)."""

    mode: str = "auto"
    name: str | None = None

    def to_openai(self) -> str | dict[str, Any]:
        if self.name is not None:
            return {"type": "function", "function": {"name": self.name}}
        return self.mode


@dataclass
class ChatInput:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    tool_choice: ToolChoice
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    # Set when the user said skip_special_tokens explicitly (Metadata).
    skip_special_tokens: bool | None = None


def parse_tool_calls(raw: str, where: str) -> list[dict[str, Any]]:
    """A message's `tool_calls` JSON (OpenAI format), validated.

    `function.arguments` is a JSON-encoded string (OpenAI's format) and stays
    one: vLLM's renderer decodes it into a mapping before templating (templates
    iterate it), but silently replaces invalid JSON with `{}` — so it is
    checked here and bad JSON is an error instead. An object given where the
    string belongs is encoded.
    """
    calls = peer_json.loads(raw, f"{where}.tool_calls")
    if not isinstance(calls, list):
        raise InvalidArgument(f"{where}.tool_calls must be a JSON array")
    out: list[dict[str, Any]] = []
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            raise InvalidArgument(f"{where}.tool_calls[{i}] must be an object")
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidArgument(f"{where}.tool_calls[{i}].function.name is missing")
        args = fn.get("arguments", "")
        if isinstance(args, str):
            if not args.strip():
                args = "{}"
            else:
                peer_json.loads(args, f"{where}.tool_calls[{i}].function.arguments")
        else:
            args = json.dumps(args)
        call = dict(call)
        call["function"] = {**fn, "arguments": args}
        call.setdefault("type", "function")
        out.append(call)
    return out


def convert_messages(messages: Sequence[MessageLike]) -> list[dict[str, Any]]:
    if not messages:
        raise InvalidArgument("UseTokenizerTemplate is set but Messages is empty")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role = m.role.strip().lower()
        where = f"Messages[{i}]"
        if role not in ROLES:
            raise InvalidArgument(
                f"{where}.role {m.role!r} is not one of {', '.join(sorted(ROLES))}"
            )
        msg: dict[str, Any] = {"role": role, "content": m.content}
        if m.name:
            msg["name"] = m.name
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        if m.tool_calls.strip():
            if role != "assistant":
                raise InvalidArgument(f"{where}: only assistant messages carry tool_calls")
            msg["tool_calls"] = parse_tool_calls(m.tool_calls, where)
        out.append(msg)
    return out


def parse_tools(raw: str) -> list[dict[str, Any]] | None:
    if not raw.strip():
        return None
    tools = peer_json.loads(raw, "Tools")
    if not isinstance(tools, list):
        raise InvalidArgument("Tools must be a JSON array of OpenAI tool definitions")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidArgument(
                f"Tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}"
            )
        if tool.get("type", "function") != "function":
            raise InvalidArgument(f"Tools[{i}].type must be 'function'")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidArgument(f"Tools[{i}].function.parameters must be a JSON schema object")
    return tools or None


def parse_tool_choice(raw: str, tools: list[dict[str, Any]] | None) -> ToolChoice:
    """`ToolChoice` is a JSON string (`"auto"`) or object; a bare word is accepted too."""
    text = raw.strip()
    if not text:
        return ToolChoice("auto")
    value: Any = text
    if text[0] in '{"':
        value = peer_json.loads(text, "ToolChoice")
    if isinstance(value, str):
        mode = value.strip().lower()
        if mode not in ("none", "auto", "required"):
            raise InvalidArgument(
                f"ToolChoice {value!r} must be none, auto, required or a function"
            )
        if mode == "required" and not tools:
            raise InvalidArgument("ToolChoice is 'required' but no Tools were given")
        return ToolChoice(mode)
    if isinstance(value, dict):
        fn = value.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidArgument(
                "ToolChoice object must be {'type': 'function', 'function': {'name': ...}}"
            )
        names = [t["function"]["name"] for t in tools or ()]
        if name not in names:
            raise InvalidArgument(
                f"ToolChoice names function {name!r}, which is not in Tools {names}"
            )
        return ToolChoice("function", name)
    raise InvalidArgument("ToolChoice must be a string or an object")


def _bool(value: str, key: str) -> bool:
    on = switch(value, empty=None)
    if on is None:
        raise InvalidArgument(f"Metadata[{key!r}] must be true or false, got {value!r}")
    return on


def template_kwargs(metadata: Mapping[str, str]) -> tuple[dict[str, Any], bool | None]:
    """Metadata → (chat_template_kwargs, explicit skip_special_tokens or None)."""
    kwargs: dict[str, Any] = {}
    raw = metadata.get("chat_template_kwargs", "")
    if raw.strip():
        data = peer_json.loads(raw, "Metadata['chat_template_kwargs']")
        if not isinstance(data, dict):
            raise InvalidArgument("Metadata['chat_template_kwargs'] must be a JSON object")
        kwargs.update(data)
    if "enable_thinking" in metadata:
        # The explicit flag wins over the same key inside chat_template_kwargs.
        kwargs["enable_thinking"] = _bool(metadata["enable_thinking"], "enable_thinking")
    skip = None
    if "skip_special_tokens" in metadata:
        skip = _bool(metadata["skip_special_tokens"], "skip_special_tokens")
    return kwargs, skip


def chat_input(
    messages: Sequence[MessageLike], tools_json: str, tool_choice: str, metadata: Mapping[str, str]
) -> ChatInput:
    """Messages, Tools, ToolChoice and Metadata of a chat request, checked."""
    converted = convert_messages(messages)
    tools = parse_tools(tools_json)
    choice = parse_tool_choice(tool_choice, tools)
    kwargs, skip = template_kwargs(metadata)
    return ChatInput(
        messages=converted,
        # With tool_choice none the renderer leaves the tools out of the
        # prompt (the engine module sets vLLM's exclude flag).
        tools=tools,
        tool_choice=choice,
        template_kwargs=kwargs,
        skip_special_tokens=skip,
    )
