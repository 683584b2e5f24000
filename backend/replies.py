"""Reply / ChatDelta / logprobs / usage builders: engine results → protobuf messages.

Rule for `Reply.message` vs `chat_deltas` (the gateway reads both: it shows
`chat_deltas` when a Reply has them, else `message`): `message` carries the
*content* text only — what the end
user reads as the answer, never reasoning or tool-call markup — and when the
request is a chat (or a parser is active) `chat_deltas` carry the same content
plus reasoning and tool calls. So `message` always equals the concatenation
of `chat_deltas[].content`, streamed or not. Nothing is repeated in the final
streamed Reply: it carries only what was held back, plus usage and the whole
completion's logprobs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from backend.gen import backend_pb2 as pb


@dataclass(slots=True)
class ToolCallPiece:
    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(slots=True)
class ChatPiece:
    """What one step adds to the answer, already split by the parsers."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallPiece] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_ms: float = 0.0
    generation_ms: float = 0.0


def usage(
    final: Any,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    started: float,
    first_at: float,
    done: float,
) -> Usage:
    """Usage and timings, one definition for Predict and PredictStream.

    `timing_prompt_processing`: ms from the request's arrival at the engine to
    its first token, as the engine measured it (`first_token_latency`); when
    the engine keeps no statistics (DisableLogStatus), ms from the call into
    the engine to the first output read (`first_at`; a unary request reads
    one output, at the end). `timing_token_generation`: the rest, to the end.
    `started`, `first_at`, `done`: time.monotonic() readings.
    """
    total_ms = (done - started) * 1000.0
    metrics = getattr(final, "metrics", None)
    first = getattr(metrics, "first_token_latency", 0.0) or 0.0
    prompt_ms = min(first * 1000.0, total_ms) if first else ((first_at or done) - started) * 1000.0
    return Usage(prompt_tokens, completion_tokens, prompt_ms, total_ms - prompt_ms)


def chat_delta(piece: ChatPiece) -> pb.ChatDelta:
    return pb.ChatDelta(
        content=piece.content,
        reasoning_content=piece.reasoning,
        tool_calls=[
            pb.ToolCallDelta(index=t.index, id=t.id, name=t.name, arguments=t.arguments)
            for t in piece.tool_calls
        ],
    )


def text_reply(text: str, *, chat: bool) -> pb.Reply:
    """A streamed chunk that is only content: what `reply` builds from
    ChatPiece(content=text), without the piece."""
    out = pb.Reply(message=text.encode("utf-8", "surrogatepass"))
    if chat:
        out.chat_deltas.add(content=text)
    return out


def reply(
    piece: ChatPiece | None,
    *,
    chat: bool,
    usage: Usage | None = None,
    logprobs: bytes = b"",
) -> pb.Reply:
    """One Reply: a streamed chunk (usage None) or a final/unary one."""
    out = pb.Reply()
    if piece is not None:
        if piece.content:
            out.message = piece.content.encode("utf-8", "surrogatepass")
        if chat and piece:
            out.chat_deltas.append(chat_delta(piece))
    if usage is not None:
        out.tokens = usage.completion_tokens
        out.prompt_tokens = usage.prompt_tokens
        out.timing_prompt_processing = usage.prompt_ms
        out.timing_token_generation = usage.generation_ms
    if logprobs:
        out.logprobs = logprobs
    return out


# ---- logprobs: vLLM SampleLogprobs → OpenAI chat `logprobs` JSON ----------------


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": max(logprob, -9999.0),  # OpenAI's floor for -inf
        "bytes": list(token.encode("utf-8", "surrogatepass")),
    }


def logprob_entries(
    token_ids: Sequence[int],
    positions: Iterable[Mapping[int, Any] | None],
    top_n: int,
    decode: Any,
) -> list[dict[str, Any]]:
    """One OpenAI `content[]` entry per generated token.

    `positions[i]` maps token id → vLLM `Logprob` (logprob, rank,
    decoded_token) and always includes the sampled token `token_ids[i]`.
    `decode(id)` is the fallback when vLLM did not decode a token.
    """
    out: list[dict[str, Any]] = []
    for token_id, position in zip(token_ids, positions, strict=False):
        if not position:
            continue
        chosen = position.get(token_id)
        if chosen is None:
            continue
        text = chosen.decoded_token if chosen.decoded_token is not None else decode(token_id)
        entry = _entry(text, chosen.logprob)
        tops = sorted(
            position.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30
        )
        entry["top_logprobs"] = [
            _entry(lp.decoded_token if lp.decoded_token is not None else decode(tid), lp.logprob)
            for tid, lp in tops[:top_n]
        ]
        out.append(entry)
    return out


def logprobs_json(entries: list[dict[str, Any]]) -> bytes:
    if not entries:
        return b""
    return json.dumps({"content": entries}, ensure_ascii=False, separators=(",", ":")).encode()


# ---- pieces ---------------------------------------------------------------------


def piece_from_delta(delta: Any) -> ChatPiece:
    """vLLM `DeltaMessage` (content, reasoning, tool_calls) → ChatPiece."""
    piece = ChatPiece(content=delta.content or "", reasoning=delta.reasoning or "")
    for call in delta.tool_calls or ():
        fn = call.function
        piece.tool_calls.append(
            ToolCallPiece(
                index=call.index,
                id=call.id or "",
                name=(fn.name or "") if fn is not None else "",
                arguments=(fn.arguments or "") if fn is not None else "",
            )
        )
    return piece


def merge(into: ChatPiece, more: ChatPiece) -> ChatPiece:
    """Append `more` to `into` (streamed pieces of one Reply)."""
    into.content += more.content
    into.reasoning += more.reasoning
    for call in more.tool_calls:
        last = into.tool_calls[-1] if into.tool_calls else None
        if last is not None and last.index == call.index and not call.name:
            last.arguments += call.arguments
        else:
            into.tool_calls.append(call)
    return into


@dataclass
class LogprobsSink:
    """Collects OpenAI logprob entries: per chunk, and for the whole completion."""

    top_n: int
    decode: Callable[[int], str]

    def __post_init__(self) -> None:
        self.all: list[dict[str, Any]] = []
        self.chunk: list[dict[str, Any]] = []

    def add(self, token_ids: Sequence[int], positions: Any) -> None:
        if positions is None:
            return
        entries = logprob_entries(token_ids, positions, self.top_n, self.decode)
        self.chunk.extend(entries)
        self.all.extend(entries)

    def take_chunk(self) -> bytes:
        out, self.chunk = logprobs_json(self.chunk), []
        return out

    def whole(self) -> bytes:
        return logprobs_json(self.all)
