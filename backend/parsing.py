"""Model output → the ChatPieces a Reply carries, through vLLM's own parsers.

`OutputState` is the per-request state: feed it each engine delta, it returns
the `ChatPiece` to send. It wraps one instance of vLLM's unified `Parser`
(`vllm.parser`), the object vLLM's OpenAI server uses, so model formats are
never re-implemented here. Streamed pieces concatenate to the non-streamed
result by construction: tool calls are sent whole at the end, parsed from the
whole text like a unary request (the rule and its latency cost are in
`OutputState`'s docstring). Which parsers a model gets is decided in
`backend/parser_choice.py`.

This module does not import vLLM: the parser object is handed in.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backend.replies import ChatPiece, ToolCallPiece, logprob_entries, logprobs_json

log = logging.getLogger(__name__)


def new_tool_call_id() -> str:
    # vLLM's server format, so clients see the same shape of id.
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


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


# Text that starts a tool call in some format vLLM parses (hermes, qwen3_coder,
# llama3_json, mistral, granite, phi4_mini_json, deepseek_v3, xlam's fenced
# block). While a tool parser is active, streamed content stops at the first
# of these; a suffix that could be the beginning of one waits for the next delta.
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
)
# Tool parsers whose whole-text path drops all text once it finds a call
# anywhere (llama3_json: any `{"name": ...}` object): with them, content
# cannot be known before the end and is held whole while tools are offered.
WHOLE_TEXT_CALL_PARSERS: frozenset[str] = frozenset({"Llama3JsonToolParser"})
# Content that starts with one of these may be a bare call (xlam / llama3_json
# JSON, pythonic lists): held whole when a tool parser is active.
CALL_SHAPES: tuple[str, ...] = ("{", "[")


def _partial_marker_at_end(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker."""
    longest = max(len(m) for m in markers)
    tail = text[-longest:]
    if not any(m[0] in tail for m in markers):
        return 0
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


class OutputState:
    """Per-request output state: engine deltas in, ChatPieces out.

    Without a parser every delta is content. With one, the stream equals the
    non-streamed (unary) result *by construction*, whatever vLLM's streaming
    path does. vLLM 0.32's streaming and whole-text paths disagree on real
    formats (a hermes list `<tool_call>[{...}]</tool_call>` streams as a call
    with broken arguments but is plain content unary; a call cut by the token
    limit streams as a partial call but is content unary; xlam leaks
    `<tool_call` into streamed content, ...), so the rule is:

    * Reasoning streams as vLLM's streaming parser splits it (minus delta
      pieces that are just a reasoning marker such as `<think>`).
    * Content streams while it cannot be part of a tool call: with a tool
      parser active it stops at the first call marker (`CALL_MARKERS`), is
      held whole when it starts like a bare call (`{`, `[`), and a trailing
      suffix that may begin a marker, or trailing whitespace, waits for the
      next delta.
    * Tool calls are never streamed piecemeal. At the end of generation the
      whole text goes through the same whole-text parse as a unary request;
      the final piece carries what that parse has beyond what was streamed:
      the rest of the reasoning and content, and every call complete (name
      and whole arguments, each once).

    Latency cost: a tool call (its name and arguments) reaches the client
    with the final Reply instead of token by token, and so does any content
    generated after a call started; an answer that starts with `{`/`[` while
    tools are offered arrives whole at the end; other content lags by at most
    one delta (a marker prefix or whitespace at its end). The final whole-text
    parse costs the same as a unary request's (microseconds to a
    millisecond; `tests/unit/test_stream_matrix.py`).

    Should streamed reasoning/content ever not be a prefix of the whole-text
    result (a format this rule does not foresee), the rest after the common
    prefix is sent and a warning logged: a stream cannot take text back.
    """

    def __init__(
        self,
        parser: Any | None,
        request: Any | None,
        logprobs: LogprobsSink | None = None,
        markers: Mapping[int, str] | None = None,
        whole_parser: Any | None = None,
    ) -> None:
        self.parser = parser
        # A fresh parser for the final whole-text parse (the streaming one
        # carries state); the streaming one is used when none is given.
        self.whole_parser = whole_parser
        # Added-token id → text: the format markers (<think>, <tool_call>, ...).
        self.markers = markers or {}
        self.request = request
        self.logprobs = logprobs
        self.prompt_token_ids: list[int] | None = None
        self._chunks: list[str] = []  # the generated text so far
        self._ids: list[int] = []
        self._sent_content = ""
        self._sent_reasoning = ""
        self._pending = ""  # content not sent yet (whitespace / marker prefix at its end)
        self._holding = False  # a call (maybe) started: content waits for the end
        tool_parser = getattr(parser, "tool_parser", None)
        self._tools_active = tool_parser is not None and (
            request is None or getattr(request, "tool_choice", None) != "none"
        )
        self._hold_all_content = (
            self._tools_active and type(tool_parser).__name__ in WHOLE_TEXT_CALL_PARSERS
        )
        # Whether the whole-text reasoning split already has content for the
        # text so far (then content streamed after it cannot move back).
        self._content_confirmed = getattr(parser, "reasoning_parser", None) is None
        reasoning_parser = getattr(parser, "reasoning_parser", None)
        self._reasoning_markers = {
            m
            for m in (
                getattr(reasoning_parser, "start_token", None),
                getattr(reasoning_parser, "end_token", None),
            )
            if isinstance(m, str) and m
        }

    def feed(
        self,
        text: str,
        token_ids: Sequence[int],
        positions: Any = None,
        *,
        finished: bool = False,
    ) -> ChatPiece:
        if self.logprobs is not None:
            self.logprobs.add(token_ids, positions)
        if self.parser is None:
            return ChatPiece(content=text)
        self._chunks.append(text)
        self._ids.extend(token_ids)
        streamed = ChatPiece()
        parts = self._split_markers(text, token_ids)
        for i, (part_text, part_ids) in enumerate(parts):
            delta = self.parser.parse_delta(
                delta_text=part_text,
                delta_token_ids=part_ids,
                request=self.request,
                prompt_token_ids=self.prompt_token_ids,
                finished=finished and i == len(parts) - 1,
            )
            if delta is not None:
                part = piece_from_delta(delta)
                if part.reasoning in self._reasoning_markers:
                    part.reasoning = ""
                merge(streamed, part)
        if finished:
            # The last piece is what the whole-text parse has beyond what was
            # sent, whatever this delta's streamed pieces say.
            return self._finish()
        piece = ChatPiece(reasoning=streamed.reasoning, content=self._content(streamed))
        self._sent_reasoning += piece.reasoning
        self._sent_content += piece.content
        return piece

    def _content(self, streamed: ChatPiece) -> str:
        """What of the streamed content may go out now (see the class docstring)."""
        if streamed.tool_calls:
            self._holding = True
        if self._holding or self._hold_all_content:
            return ""
        text = self._pending + streamed.content
        self._pending = ""
        if text and not self._content_confirmed:
            # vLLM's streaming path ends reasoning at the end token's *id*,
            # its whole-text path at the end token's *text*; with the markers
            # as special tokens skipped in the text they disagree.
            self._content_confirmed = self._whole_text_has_content()
            if not self._content_confirmed:
                self._pending = text
                return ""
        if not self._tools_active:
            keep = len(text) - len(text.rstrip())
        else:
            started = bool(self._sent_content)  # sent content never ends in whitespace
            if not started and not text.strip():
                self._pending = text
                return ""
            if not started and text.lstrip().startswith(CALL_SHAPES):
                self._holding = True
                return ""
            cut = min((i for m in CALL_MARKERS if (i := text.find(m)) >= 0), default=-1)
            if cut >= 0:
                self._holding = True
                text = text[:cut]
            partial = _partial_marker_at_end(text, CALL_MARKERS)
            body = text[: len(text) - partial]
            keep = partial + len(body) - len(body.rstrip())
            if self._holding:
                return text[: len(text) - keep] if keep else text
        if keep:
            self._pending = text[len(text) - keep :]
            text = text[: len(text) - keep]
        return text

    def _whole_text_has_content(self) -> bool:
        extract = getattr(self.whole_parser or self.parser, "extract_reasoning", None)
        if extract is None:
            return True
        _, content = extract("".join(self._chunks), self.request)
        return content is not None

    def _finish(self) -> ChatPiece:
        """End of generation: what the whole-text parse has beyond what was sent."""
        text = "".join(self._chunks)
        whole = self._parse(self.whole_parser or self.parser, text, self._ids)
        piece = ChatPiece(tool_calls=whole.tool_calls)
        piece.reasoning = self._rest("reasoning", self._sent_reasoning, whole.reasoning)
        piece.content = self._rest("content", self._sent_content, whole.content)
        return piece

    @staticmethod
    def _rest(what: str, sent: str, whole: str) -> str:
        if whole.startswith(sent):
            return whole[len(sent) :]
        common = 0
        for a, b in zip(sent, whole, strict=False):
            if a != b:
                break
            common += 1
        log.warning(
            "streamed %s differs from the whole-text parse after %d characters (sent %r, whole %r)",
            what,
            common,
            sent[common : common + 40],
            whole[common : common + 40],
        )
        return whole[common:]

    def _split_markers(self, text: str, ids: Sequence[int]) -> list[tuple[str, list[int]]]:
        """Give each marker token a delta of its own.

        vLLM merges deltas when we read slower than it generates, so one delta
        can hold `<think>` and the text after it; some of vLLM's parsers
        (e.g. deepseek_r1's streaming path) then leak the marker into the
        reasoning. Splitting at added tokens makes parsing independent of how
        the engine happened to chunk the output. Cheap when no marker is in
        the delta, which is nearly always.
        """
        ids = list(ids)
        if len(ids) < 2 or not any(t in self.markers for t in ids):
            return [(text, ids)]
        parts: list[tuple[str, list[int]]] = []
        pos = start = 0
        for i, token in enumerate(ids):
            marker = self.markers.get(token)
            if marker is None:
                continue
            at = text.find(marker, pos)
            if at < 0:
                # A special token skipped from the text: where it sits in the
                # text is known only at either end of what is left.
                if i == start:
                    parts.append(("", [token]))
                    start = i + 1
                    continue
                if i == len(ids) - 1:
                    return [*parts, (text[pos:], ids[start:i]), ("", [token])]
                return [(text, ids)] if not parts else [*parts, (text[pos:], ids[start:])]
            if i > start or at > pos:
                parts.append((text[pos:at], ids[start:i]))
            parts.append((marker, [token]))
            pos, start = at + len(marker), i + 1
        if start < len(ids) or pos < len(text):
            parts.append((text[pos:], ids[start:]))
        return parts

    def parse_whole(self, text: str, token_ids: Sequence[int], positions: Any = None) -> ChatPiece:
        """Non-streaming: the parser's whole-text path, as vLLM's server uses it."""
        if self.logprobs is not None:
            self.logprobs.add(token_ids, positions)
        if self.parser is None:
            return ChatPiece(content=text)
        return self._parse(self.parser, text, token_ids)

    def _parse(self, parser: Any, text: str, token_ids: Sequence[int]) -> ChatPiece:
        reasoning, content, calls = parser.parse(
            text, self.request, enable_auto_tools=True, model_output_token_ids=list(token_ids)
        )
        piece = ChatPiece(content=content or "", reasoning=reasoning or "")
        for i, call in enumerate(calls or ()):
            piece.tool_calls.append(
                ToolCallPiece(
                    index=i,
                    id=getattr(call, "id", None) or new_tool_call_id(),
                    name=call.name,
                    arguments=call.arguments,
                )
            )
        return piece

    def chunk_logprobs(self) -> bytes:
        return self.logprobs.take_chunk() if self.logprobs is not None else b""

    def all_logprobs(self) -> bytes:
        return self.logprobs.whole() if self.logprobs is not None else b""
