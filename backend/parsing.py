"""Model text → content / reasoning / tool calls, through vLLM's own parsers.

Two parts:

* `choose_parsers`: which vLLM tool and reasoning parser fit a model, from
  an explicit Options setting or, failing that, a family table.
* `OutputState`: the per-request streaming state. Feed it each engine delta;
  it returns the `ChatPiece` to send. It wraps one instance of vLLM's
  unified `Parser` (`vllm.parser`), the object vLLM's OpenAI server uses, so
  model formats are never re-implemented here. The parser's `finished=True`
  call flushes what it held back (unstreamed tool-call arguments, buffered
  engine-parser text); that piece goes into the final Reply.

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


# (needle in model_type / architectures / name, tool parser, reasoning parser).
# First match wins, so specific families come before the generic ones.
FAMILY_PARSERS: tuple[tuple[str, str | None, str | None], ...] = (
    ("gpt_oss", "openai", "openai_gptoss"),
    ("gpt-oss", "openai", "openai_gptoss"),
    ("qwen3_coder", "qwen3_coder", None),
    ("qwen3-coder", "qwen3_coder", None),
    ("qwq", "hermes", "deepseek_r1"),
    ("qwen3", "hermes", "qwen3"),
    ("deepseek-r1-distill", "hermes", "deepseek_r1"),
    ("deepseek-r1", "deepseek_v3", "deepseek_r1"),
    ("deepseek_v3", "deepseek_v3", "deepseek_v3"),
    ("deepseek-v3", "deepseek_v3", "deepseek_v3"),
    ("qwen2", "hermes", None),
    ("hermes", "hermes", None),
    ("magistral", "mistral", "mistral"),
    ("mistral", "mistral", None),
    ("mixtral", "mistral", None),
    ("llama4", "llama4_pythonic", None),
    ("llama-4", "llama4_pythonic", None),
    ("llama-3", "llama3_json", None),
    ("llama3", "llama3_json", None),
    ("llama", "llama3_json", None),
    ("granite", "granite", "granite"),
)


def family_parsers(
    model_type: str, architectures: Sequence[str], name: str
) -> tuple[str | None, str | None, str]:
    """(tool parser, reasoning parser, what matched) from the family table.

    The model name is searched first (it distinguishes e.g. DeepSeek-R1
    distills from their Qwen/Llama base), then model_type and architectures.
    """
    haystacks = [name.lower(), model_type.lower(), *(a.lower() for a in architectures)]
    for hay in haystacks:
        for needle, tool, reasoning in FAMILY_PARSERS:
            if needle in hay:
                return tool, reasoning, needle
    return None, None, ""


def choose_parsers(
    explicit_tool: str | None,
    explicit_reasoning: str | None,
    *,
    model_type: str,
    architectures: Sequence[str],
    name: str,
    known_tool: Sequence[str],
    known_reasoning: Sequence[str],
) -> tuple[str | None, str | None]:
    """Explicit setting wins ("" = explicitly none); else the family table.

    An unknown explicit name is an error listing the valid ones; an
    auto-chosen name this vLLM lacks is just skipped (logged).
    """
    from backend.errors import InvalidArgument

    auto_tool, auto_reasoning, matched = family_parsers(model_type, architectures, name)
    chosen: list[str | None] = []
    for kind, explicit, auto, known in (
        ("tool", explicit_tool, auto_tool, known_tool),
        ("reasoning", explicit_reasoning, auto_reasoning, known_reasoning),
    ):
        if explicit is not None:
            if explicit and explicit not in known:
                raise InvalidArgument(
                    f"unknown {kind}_parser {explicit!r}; valid names: {', '.join(sorted(known))}"
                )
            chosen.append(explicit or None)
            log.info("%s parser: %s (from Options)", kind, explicit or "none")
        elif auto and auto in known:
            chosen.append(auto)
            log.info("%s parser: %s (chosen for model family %r)", kind, auto, matched)
        else:
            chosen.append(None)
            log.info("%s parser: none", kind)
    return chosen[0], chosen[1]


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


class OutputState:
    """Per-request output state: engine deltas in, ChatPieces out.

    Without a parser every delta is content. With one, each delta goes
    through `parser.parse_delta`; the engine's last output is fed with
    `finished=True` so the parser flushes whatever it held back.
    """

    def __init__(
        self,
        parser: Any | None,
        request: Any | None,
        logprobs: LogprobsSink | None = None,
        markers: Mapping[int, str] | None = None,
    ) -> None:
        self.parser = parser
        # Added-token id → text: the format markers (<think>, <tool_call>, ...).
        self.markers = markers or {}
        self.request = request
        self.logprobs = logprobs
        self.prompt_token_ids: list[int] | None = None
        self._held_space = ""  # whitespace-only content not sent yet
        self._tool_called = False
        self._content_started = False

    def _hold_whitespace(self, piece: ChatPiece, finished: bool) -> ChatPiece:
        """Whitespace-only content is held until real text follows.

        vLLM's parsers stream the blank lines around a tool call (between
        `</think>` and `<tool_call>`, after `</tool_call>`) as content, while
        their whole-text path drops them. Holding them back makes the streamed
        content equal the non-streamed content; if the answer ends with no
        tool call, what was held is sent with the final Reply.
        """
        text = self._held_space + piece.content
        self._held_space = ""
        if piece.tool_calls:
            # The whole-text path keeps text before the first call only when
            # there is real text in it.
            if not (self._content_started or text.strip()):
                text = ""
            self._tool_called = True
        elif text and not text.strip() and not (finished and not self._tool_called):
            self._held_space, text = text, ""
        if finished and self._tool_called and not text.strip():
            text = ""
        if text.strip():
            self._content_started = True
        piece.content = text
        return piece

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
        piece = ChatPiece()
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
                merge(piece, piece_from_delta(delta))
        return self._hold_whitespace(piece, finished)

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
            if at < 0:  # marker not in the text (skipped special token): no split
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
        reasoning, content, calls = self.parser.parse(
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
