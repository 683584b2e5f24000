"""Feed `OutputState` a model output cut into engine deltas, as vLLM would hand it over.

The streamed == unary tests (`tests/unit/test_streaming_parsers.py`, the matrix in
`tests/unit/test_stream_matrix.py`) drive vLLM's real parsers without an engine:
the token ids are cut into chunks of `size` tokens, and each delta's text is what
decoding adds, held back while it ends in a split character, as vLLM's
incremental detokenizer does.

`held_back` measures what a stream kept from the client: bytes of the final
result that went out later than the first delta after which they were already
determined (no continuation of the text could change them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from backend.output.state import OutputState


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
    """The concatenation of every piece a stream sent, and what had gone out
    after each delta (`trace`: one `fields()` tuple per delta)."""

    reasoning: str = ""
    content: str = ""
    calls: list[StreamedCall] = field(default_factory=list)  # by call index
    trace: list[tuple[str, ...]] = field(default_factory=list)
    delta_bytes: list[int] = field(default_factory=list)  # each delta's text, in bytes

    def fields(self) -> tuple[str, ...]:
        out = [self.reasoning, self.content]
        for call in self.calls:
            out += [call.name, call.arguments]
        return tuple(out)


def fields_of(piece: Any) -> tuple[str, ...]:
    """A whole result (ChatPiece) as the same tuple `Streamed.fields` gives."""
    out = [piece.reasoning, piece.content]
    for call in piece.tool_calls:
        out += [call.name, call.arguments]
    return tuple(out)


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
        out.trace.append(out.fields())
        out.delta_bytes.append(len(delta.encode()))
    return out


def determined(results: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    """What every one of `results` (the whole-text results of the same text
    with different continuations) agrees on: per field, the common prefix;
    a call's name counts only whole (it is sent whole)."""
    width = max(len(r) for r in results)
    out = []
    for i in range(width):
        values = [r[i] if i < len(r) else "" for r in results]
        if i >= 2 and i % 2 == 0:  # a call's name
            out.append(values[0] if all(v == values[0] for v in values) else "")
            continue
        common = values[0]
        for v in values[1:]:
            n = 0
            for a, b in zip(common, v, strict=False):
                if a != b:
                    break
                n += 1
            common = common[:n]
        out.append(common)
    return tuple(out)


def held_back(trace: Sequence[tuple[str, ...]], known: Sequence[tuple[str, ...]]) -> int:
    """Bytes that went out after a later delta than the one after which they
    were determined. `trace[k]`: what had been sent after delta k; `known[k]`:
    what was determined after it (`determined` over continuations of the text
    so far, the real one among them)."""
    late = 0
    final = trace[-1]
    for f, value in enumerate(final):
        data = value.encode()
        sent_at = _first_delta(trace, f, len(data))
        known_at = _first_delta(known, f, len(data))
        for j in range(len(data)):
            if sent_at[j] > known_at[j]:
                late += 1
    return late


def _first_delta(steps: Sequence[tuple[str, ...]], f: int, size: int) -> list[int]:
    """For each byte of field f, the first step at which it was there."""
    first = [len(steps)] * size
    filled = 0
    for k, step in enumerate(steps):
        have = len(step[f].encode()) if f < len(step) else 0
        while filled < min(have, size):
            first[filled] = k
            filled += 1
    return first


def known_after_each_delta(
    unary: Callable[[str, list[int]], tuple[str, ...]],
    tokenizer: Any,
    ids: Sequence[int],
    size: int,
    continuations: Sequence[str | tuple[str, ...]],
    *,
    skip_special_tokens: bool = False,
) -> list[tuple[str, ...]]:
    """`determined` after each delta of `size` tokens: the whole-text results
    of the text so far followed by the real rest and by each continuation (a
    tuple of strings is tokenized piece by piece: a marker spelled in plain
    tokens, which a model may sample though no tokenizer would produce it)."""
    size = size or len(ids)
    final = unary(tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), list(ids))
    out = []
    for start in range(0, len(ids), size):
        end = min(start + size, len(ids))
        if end == len(ids):
            out.append(final)
            continue
        prefix = list(ids[:end])
        results = [final]
        for extra in continuations:
            # a tuple: pieces tokenized apart (a marker written in plain tokens)
            pieces = extra if isinstance(extra, tuple) else (extra,)
            more = list(prefix)
            for piece in pieces:
                more += tokenizer.encode(piece, add_special_tokens=False)
            results.append(
                unary(tokenizer.decode(more, skip_special_tokens=skip_special_tokens), more)
            )
        out.append(determined(results))
    return out
