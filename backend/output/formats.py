"""How each tool parser family writes its calls: one row per family (`FORMATS`).

`CallScanner` (calls.py) reads calls out of the content with these rows; the
bodies (bodies.py) read each call region's inside. A row says where a family's
calls start and end, how their body is written, and the few points where the
family's whole-text rule differs from the others (which key holds the
arguments, whether a string `arguments` passes through, whether whitespace
between calls is content).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# DeepSeek's markers use FULLWIDTH VERTICAL LINE and LOWER ONE EIGHTH BLOCK.
DS_CALLS_BEGIN = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
DS_CALLS_END = "<\uff5ctool\u2581calls\u2581end\uff5c>"
DS_CALL_BEGIN = "<\uff5ctool\u2581call\u2581begin\uff5c>"
DS_CALL_END = "<\uff5ctool\u2581call\u2581end\uff5c>"
DS_SEP = "<\uff5ctool\u2581sep\uff5c>"
DS_ARGS_END = "\n```" + DS_CALL_END


@dataclass(frozen=True)
class CallFormat:
    """How one parser family writes calls (see `FORMATS`)."""

    body: str  # "object", "list", "python", "deepseek", or "raw" (the content is the arguments)
    # (opening marker, closing marker or "") of each kind of call region; the
    # markers are markup, never content; a closing one is optional at the end
    regions: tuple[tuple[str, str], ...] = ()
    bare: str = ""  # "{" or "[": a body may open without a marker ...
    bare_anywhere: bool = False  # ... anywhere in the content (else only at its start)
    bare_after_ws: bool = True  # ... after leading whitespace (pythonic: no)
    separator: str = ""  # between consecutive bare calls (llama3_json: ";")
    arg_keys: tuple[str, ...] = ("arguments", "parameters")
    missing_args: str = "{}"  # arguments of a call that has none
    raw_string_args: bool = False  # a string `arguments` value is passed through decoded
    keep_ws_between: bool = False  # whitespace between calls is content (granite4)
    name: str = ""  # body "raw": the call's name (a named tool_choice)


FORMATS: dict[str, CallFormat] = {
    # <tool_call>{"name": ..., "arguments": {...}}</tool_call>, repeated
    "Hermes2ProToolParser": CallFormat("object", regions=(("<tool_call>", "</tool_call>"),)),
    "Granite4ToolParser": CallFormat(
        "object",
        regions=(("<tool_call>", "</tool_call>"),),
        raw_string_args=True,
        keep_ws_between=True,
    ),
    # optional <|python_tag|>, then {"name": ..., "parameters": {...}}; {...}
    "Llama3JsonToolParser": CallFormat(
        "object", regions=(("<|python_tag|>", ""),), bare="{", bare_anywhere=True, separator=";"
    ),
    # [get_weather(city="Paris"), ...] at the start of the output
    "PythonicToolParser": CallFormat("python", bare="[", bare_after_ws=False),
    "Llama4PythonicToolParser": CallFormat(
        "python",
        regions=(("<|python_start|>", "<|python_end|>"),),
        bare="[",
        bare_after_ws=False,
    ),
    # <|tool_call|>[{"name": ..., "arguments": {...}}, ...] (Granite 3; vLLM's engine
    # parser, whose streaming path disagrees with its whole-text one when the
    # granite reasoning parser runs beside it)
    "GraniteEngineToolParser": CallFormat(
        "list", regions=(("<|tool_call|>", ""), ("<tool_call>", "</tool_call>"))
    ),
    # functools[{"name": ..., "arguments": {...}}, ...]
    "Phi4MiniJsonToolParser": CallFormat("list", regions=(("functools", ""),)),
    # [{"name": ..., "arguments": {...}}, ...], bare or fenced
    "xLAMToolParser": CallFormat(
        "list",
        regions=(
            ("```json", "```"),
            ("```", "```"),
            ("<tool_call>", "</tool_call>"),
            ("[TOOL_CALLS]", "\n"),
        ),
        bare="[",
        arg_keys=("arguments",),
        raw_string_args=True,
    ),
    # DS_CALLS_BEGIN, then per call:
    # DS_CALL_BEGIN function DS_SEP NAME\n```json\n{..}\n```DS_CALL_END
    "DeepSeekV3ToolParser": CallFormat("deepseek", regions=((DS_CALLS_BEGIN, DS_CALLS_END),)),
}
# tool_choice "required" (vLLM's own path): a JSON list of {"name", "parameters"}
REQUIRED = CallFormat("list", bare="[", arg_keys=("parameters",), missing_args="null")


def named(name: str) -> CallFormat:
    """tool_choice naming a function: the content is that call's arguments, as written."""
    return CallFormat("raw", name=name)


# Held path: text that starts a tool call in a format no scanner reads; content
# stops at the first of these, and a suffix that may begin one waits.
CALL_MARKERS: tuple[str, ...] = (
    "<tool_call>",
    "<|tool_call|>",
    "<|python_tag|>",
    "[TOOL_CALLS]",
    "functools[",
    "<function=",
    "<\uff5ctool\u2581calls\u2581begin\uff5c>",
    "<\uff5ctool\u2581call\u2581begin\uff5c>",
    "```",
    "<|start|>",
    "<start_function_call>",
)


def call_format(
    tool_parser: Any, request: Any, *, engine_streams: bool = False
) -> tuple[str, CallFormat | None]:
    """(path, format) for a request: "plain" (no tool parsing), "scan" with the
    scanner's format, "engine" (vLLM's engine parser streams: `engine_streams`,
    its reasoning parser, if any, is an engine one too) or "held"."""
    if tool_parser is None or request is None:
        return "plain", None
    choice = getattr(request, "tool_choice", None)
    if choice == "none" or not getattr(request, "tools", None):
        return "plain", None
    if getattr(tool_parser, "supports_required_and_named", True):
        function = getattr(choice, "function", None)
        if function is not None and getattr(function, "name", None):
            return "scan", named(function.name)
        if choice == "required":
            return "scan", REQUIRED
    fmt = FORMATS.get(type(tool_parser).__name__)
    if fmt is not None:
        return "scan", fmt
    if engine_streams:
        return "engine", None
    return "held", None


def reasoning_markers(reasoning_parser: Any) -> frozenset[str]:
    """The strings that open and close reasoning: never reasoning text themselves."""
    found = set()
    for attr in ("reasoning_start_str", "reasoning_end_str", "start_token", "end_token"):
        try:
            value = getattr(reasoning_parser, attr, None)
        except (ValueError, AttributeError, NotImplementedError):
            continue
        if isinstance(value, str) and value:
            found.add(value)
    return frozenset(found)
