"""Feed `OutputState` a model output cut into engine deltas, as vLLM would hand it over.

The streamed == unary tests (`tests/unit/test_streaming_parsers.py`, the matrix in
`tests/unit/test_stream_matrix.py`) drive vLLM's real parsers without an engine:
the token ids are cut into chunks of `size` tokens, and each delta's text is what
decoding adds, held back while it ends in a split character, as vLLM's
incremental detokenizer does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from backend.parsing import OutputState


def parser_class(tokenizer: Any, tool: str | None, reasoning: str | None) -> Any:
    """vLLM's unified parser class for the pair, as the worker gets it."""
    from vllm.parser import ParserManager

    return ParserManager.get_parser(
        tool_parser_name=tool,
        reasoning_parser_name=reasoning,
        enable_auto_tools=True,
        tokenizer=tokenizer,
    )


def added_markers(tokenizer: Any) -> dict[int, str]:
    """Added-token id → text, as `LoadedModel` hands them to `OutputState`."""
    return {i: t for t, i in tokenizer.get_added_vocab().items()}


@dataclass
class StreamedCall:
    name: str = ""
    arguments: str = ""
    names_sent: int = 0  # how many pieces carried the name: must be exactly 1


@dataclass
class Streamed:
    """The concatenation of every piece a stream sent."""

    reasoning: str = ""
    content: str = ""
    calls: list[StreamedCall] = field(default_factory=list)  # by call index


def stream(
    state: OutputState,
    tokenizer: Any,
    ids: Sequence[int],
    size: int,
    *,
    skip_special_tokens: bool = False,
) -> Streamed:
    """Feed `ids` to `state` in deltas of `size` tokens (0: all in one delta)."""
    size = size or len(ids)
    out = Streamed()
    calls: dict[int, StreamedCall] = {}
    sent = ""
    for start in range(0, len(ids), size):
        end = start + size
        finished = end >= len(ids)
        decoded = tokenizer.decode(ids[:end], skip_special_tokens=skip_special_tokens)
        # Like vLLM's incremental detokenizer: a character split across
        # tokens is held back until it is complete.
        if decoded.endswith("\ufffd") and not finished:
            delta = ""
        else:
            delta, sent = decoded[len(sent) :], decoded
        piece = state.feed(delta, ids[start:end], finished=finished)
        out.reasoning += piece.reasoning
        out.content += piece.content
        for call in piece.tool_calls:
            entry = calls.setdefault(call.index, StreamedCall())
            if call.name:
                entry.name = call.name
                entry.names_sent += 1
            entry.arguments += call.arguments
    out.calls = [calls[i] for i in sorted(calls)]
    return out
