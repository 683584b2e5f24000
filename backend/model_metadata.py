"""The ModelMetadata RPC: what the gateway learns about the loaded model.

The tool-format markers describe, for the tool parser in use, how the model
writes a call, so a gateway that parses text itself (or builds grammars) can
do what vLLM's parser does. Only formats whose markers are fixed strings are
listed; for others `format_type` alone says what the parser is.
"""

from __future__ import annotations

from typing import Any

from backend.gen import backend_pb2 as pb

_HERMES = {
    "format_type": "json",
    "per_call_start": "<tool_call>",
    "per_call_end": "</tool_call>",
    "name_field": "name",
    "args_field": "arguments",
}

TOOL_MARKERS: dict[str, dict[str, Any]] = {
    "hermes": _HERMES,
    "qwen3_json": _HERMES,
    "qwen3_coder": {
        "format_type": "xml",
        "per_call_start": "<tool_call>",
        "per_call_end": "</tool_call>",
        "func_name_prefix": "<function=",
        "func_name_suffix": ">",
        "func_close": "</function>",
        "arg_name_prefix": "<parameter=",
        "arg_name_suffix": ">",
        "arg_value_suffix": "</parameter>",
    },
    "llama3_json": {
        "format_type": "json",
        "per_call_start": "<|python_tag|>",
        "arg_separator": ";",
        "name_field": "name",
        "args_field": "parameters",
    },
    "mistral": {
        "format_type": "json",
        "section_start": "[TOOL_CALLS]",
        "tools_array_wrapped": True,
        "name_field": "name",
        "args_field": "arguments",
        "id_field": "id",
    },
    "granite": {
        "format_type": "json",
        "section_start": "<|tool_call|>",
        "tools_array_wrapped": True,
        "name_field": "name",
        "args_field": "arguments",
    },
    # DeepSeek's markers really use FULLWIDTH VERTICAL LINE and LOWER ONE EIGHTH BLOCK.
    "deepseek_v3": {
        "format_type": "json",
        "section_start": "<｜tool▁calls▁begin｜>",  # noqa: RUF001
        "section_end": "<｜tool▁calls▁end｜>",  # noqa: RUF001
        "per_call_start": "<｜tool▁call▁begin｜>",  # noqa: RUF001
        "per_call_end": "<｜tool▁call▁end｜>",  # noqa: RUF001
        "func_name_prefix": "function<｜tool▁sep｜>",  # noqa: RUF001
        "args_start": "```json\n",
        "args_end": "\n```",
    },
    "pythonic": {"format_type": "pythonic", "section_start": "[", "section_end": "]"},
    "llama4_pythonic": {"format_type": "pythonic", "section_start": "[", "section_end": "]"},
    "openai": {"format_type": "harmony"},
}

REASONING_MARKERS: dict[str, tuple[str, str]] = {
    "qwen3": ("<think>", "</think>"),
    "deepseek_r1": ("<think>", "</think>"),
    "deepseek_v3": ("<think>", "</think>"),
    "glm45": ("<think>", "</think>"),
    "minimax_m2": ("<think>", "</think>"),
    "seed_oss": ("<seed:think>", "</seed:think>"),
    "mistral": ("[THINK]", "[/THINK]"),
    "ernie45": ("<think>", "</think>"),
}


def tool_format(tool_parser: str | None, reasoning_parser: str | None) -> dict[str, Any]:
    """ToolFormatMarkers fields for the parsers in use (empty when unknown)."""
    markers = dict(TOOL_MARKERS.get(tool_parser or "", {}))
    if tool_parser and "format_type" not in markers:
        markers["format_type"] = tool_parser
    if reasoning_parser in REASONING_MARKERS:
        markers["reasoning_start"], markers["reasoning_end"] = REASONING_MARKERS[reasoning_parser]
    return markers


def model_metadata(model: Any) -> pb.ModelMetadataResponse:
    engine = model.engine
    template = engine.chat_template(model.chat_template)
    thinking = template is not None and engine.template_accepts(template, "enable_thinking")
    rendered = ""
    if template and (thinking or model.reasoning_parser):
        rendered = engine.render_template(
            template, [{"role": "user", "content": "Hello"}], enable_thinking=True
        )
    return pb.ModelMetadataResponse(
        supports_thinking=thinking or bool(model.reasoning_parser),
        rendered_template=rendered,
        tool_format=pb.ToolFormatMarkers(**tool_format(model.tool_parser, model.reasoning_parser)),
        media_marker=engine.media_placeholder(),
    )
