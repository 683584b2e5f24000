"""Per-request output state: engine deltas in, the ChatPieces to send out.

`OutputState.feed` takes each engine delta and returns what became certain:
reasoning, content and tool calls. Fed the whole output at once (a unary
request), it returns the unary result; a stream's pieces always concatenate
to that result, because the last `feed` sends exactly what the whole-text
reading has beyond what was sent.

Three ways through, by the request's tool parser:

* **scanned** (hermes, llama3_json, pythonic, xlam, phi4_mini_json, deepseek_v3,
  granite4, a named or `required` tool_choice, and no tools at all): vLLM's
  reasoning parser splits reasoning from content; `CallScanner` reads calls
  out of the content and streams their arguments as they become certain.
* **vLLM's engine parsers** (qwen3_coder, mistral, granite, gemma4 and the other
  `ParserEngine` formats): vLLM's own streaming output, which for these
  parsers is built to agree with its whole-text result, is sent as it comes.
* **held** (any other legacy parser: deepseek_v31, harmony, functiongemma, a
  plugin's): calls are not streamed; they arrive whole with the last piece,
  parsed from the whole text like a unary request, and content stops at the
  first call marker.

This module does not import vLLM: parsers are made by the factory handed in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backend.output.bodies import new_tool_call_id
from backend.output.bodies import partial_marker as _partial_marker
from backend.output.calls import CallScanner
from backend.output.formats import CALL_MARKERS, call_format, reasoning_markers
from backend.replies import ChatPiece, LogprobsSink, ToolCallPiece, merge, piece_from_delta

log = logging.getLogger(__name__)


class OutputState:
    """Per-request output state: engine deltas in, ChatPieces out (see the module doc).

    `new_parser` makes a fresh vLLM parser (a stream needs two: the streaming
    one carries state, the whole-text one must not); None: no parsing, every
    delta is content.
    """

    def __init__(
        self,
        new_parser: Callable[[], Any] | None,
        request: Any | None,
        *,
        logprobs: LogprobsSink | None = None,
        markers: Mapping[int, str] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
    ) -> None:
        self.logprobs = logprobs
        self.request = request
        self._new_parser = new_parser
        # The whole-text parser; the streaming one (it carries state) is made
        # on the first delta that is not the last (a unary request needs none).
        self._whole_parser = new_parser() if new_parser is not None else None
        self._stream_parser: Any | None = None
        self.prompt_token_ids = list(prompt_token_ids) if prompt_token_ids is not None else None
        # Added-token id → text: the format markers (<think>, <tool_call>, ...).
        self.markers = markers or {}
        self._chunks: list[str] = []  # the generated text so far
        self._ids: list[int] = []
        self._sent_reasoning = ""
        self._sent_content = ""
        self._pending = ""  # content waiting for the whole-text split to confirm it
        self._more_reasoning = ""  # reasoning the whole-text split has beyond the streamed
        parser = self._whole_parser
        self.path, fmt = call_format(
            getattr(parser, "tool_parser", None),
            request,
            engine_streams=bool(getattr(parser, "_engine_based", False)),
        )
        reasoning_parser = getattr(parser, "reasoning_parser", None)
        self._has_reasoning = reasoning_parser is not None
        self._reasoning_markers = reasoning_markers(reasoning_parser)
        self._reasoning_marker_list = tuple(self._reasoning_markers)
        self._reasoning_start = getattr(reasoning_parser, "reasoning_start_str", None) or ""
        # vLLM's engine parsers strip the reasoning's trailing whitespace unless
        # their format says not to (qwen3 keeps it).
        engine = getattr(reasoning_parser, "_parser_engine", None)
        config = getattr(engine, "parser_engine_config", None)
        self._strips_reasoning = bool(getattr(config, "strip_trailing_reasoning_whitespace", False))
        # A legacy reasoning parser's whole-text split is a string search: the
        # stream follows it directly. vLLM's engine reasoning parsers run their
        # whole engine over the text, too slow per delta: their streaming path
        # is used until the content starts.
        self._reasoning_by_split = self._has_reasoning and not getattr(
            reasoning_parser, "engine_based_streaming", False
        )
        # Whether the whole-text reasoning split already has content for the
        # text so far (content streamed after it cannot move back).
        self._content_confirmed = not self._has_reasoning
        self._scanner = CallScanner(fmt) if fmt is not None else None
        self._fed = ""  # content fed to the scanner
        self._stream_request = request
        if self.path in ("scan", "plain") and request is not None and parser is not None:
            # The streaming parser only splits reasoning from content: with
            # tool_choice "none" vLLM passes the content through as written.
            tools_off = getattr(request, "model_copy", None)
            if tools_off is not None and getattr(request, "tool_choice", None) != "none":
                self._stream_request = request.model_copy(update={"tool_choice": "none"})
        # Engine path: what was streamed of each call.
        self._call_names: dict[int, str] = {}
        self._call_args: dict[int, str] = {}
        self._holding = False  # held and engine paths: calls wait for the end
        self._tail = ""  # held path: content that may begin a marker, or whitespace

    # ---- feeding ----------------------------------------------------------------

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
        if self._whole_parser is None:
            return ChatPiece(content=text)
        self._chunks.append(text)
        self._ids.extend(token_ids)
        if finished:
            # The last piece is what the whole-text reading has beyond what
            # was sent, whatever this delta's streamed pieces would say.
            return self._finish()
        if self.path == "scan" or self.path == "plain":
            if not self._has_reasoning or self._content_confirmed:
                # After the reasoning, the content is the text as it comes.
                piece, content = ChatPiece(), text
            elif self._reasoning_by_split:
                piece, content = self._split_so_far()
            else:
                streamed = self._parse_delta(text, token_ids)
                self._sent_reasoning += streamed.reasoning
                content = self._confirmed(streamed.content, whole=True)
                more, self._more_reasoning = self._more_reasoning, ""
                self._sent_reasoning += more
                piece = ChatPiece(reasoning=streamed.reasoning + more)
            if self._scanner is None:
                piece.content = content
            elif content:
                self._fed += content
                merge(piece, self._scanner.feed(content))
        else:
            streamed = self._parse_delta(text, token_ids)
            piece = ChatPiece(reasoning=streamed.reasoning)
            content = self._confirmed(streamed.content, whole=False)
            if self.path == "engine":
                piece.content = content
                piece.tool_calls = self._engine_calls(streamed.tool_calls)
            else:
                piece.content = self._held_content(content, bool(streamed.tool_calls))
            self._sent_reasoning += piece.reasoning
        self._sent_content += piece.content
        return piece

    def parse_whole(self, text: str, token_ids: Sequence[int], positions: Any = None) -> ChatPiece:
        """A unary request's result: the whole output in one delta."""
        return self.feed(text, token_ids, positions, finished=True)

    def _parse_delta(self, text: str, token_ids: Sequence[int]) -> ChatPiece:
        """vLLM's streaming parser over this delta, one marker token at a time."""
        streamed = ChatPiece()
        parser = self._stream_parser
        if parser is None:
            assert self._new_parser is not None
            parser = self._stream_parser = self._new_parser()
        for part_text, part_ids in self._split_markers(text, token_ids):
            delta = parser.parse_delta(
                delta_text=part_text,
                delta_token_ids=part_ids,
                request=self._stream_request,
                prompt_token_ids=self.prompt_token_ids,
                finished=False,
            )
            if delta is not None:
                part = piece_from_delta(delta)
                if part.reasoning in self._reasoning_markers:
                    part.reasoning = ""  # a marker token is markup, never reasoning
                merge(streamed, part)
        return streamed

    def _split_so_far(self) -> tuple[ChatPiece, str]:
        """(reasoning piece, content) from the whole-text split of the text so
        far: a legacy reasoning parser splits with a string search, cheap enough
        to run on every delta until the content starts, and its split is the
        unary result's, so what goes out is certain (markers never among it)."""
        reasoning, content = self._whole_split("".join(self._chunks))
        if content is None:
            rest = self._reasoning_rest(reasoning or "")
        else:
            self._content_confirmed = True  # the reasoning is whole
            rest = _after(self._sent_reasoning, reasoning or "")
        self._sent_reasoning += rest
        return ChatPiece(reasoning=rest), content or ""

    def _confirmed(self, content: str, *, whole: bool) -> str:
        """Content, once the whole-text reading agrees that content has begun.

        vLLM's streaming path ends reasoning at the end token's *id*, its
        whole-text path at the end token's *text*; with the markers as special
        tokens skipped in the text they disagree, so streamed content waits
        until the whole text has content too. From then on the content is fed
        as it comes. `whole`: on confirmation, the whole text's content so far
        goes out instead of the waiting streamed pieces (the scanner must read
        what the whole-text split gives; the streamed pieces may differ from it
        in whitespace)."""
        if self._content_confirmed:
            return content
        self._pending += content
        if not self._pending:
            return ""
        text = "".join(self._chunks)
        if _partial_marker(text, self._reasoning_marker_list):
            return ""  # a reasoning marker may be starting: the split may still move
        reasoning, so_far = self._whole_split(text)
        if so_far is None:
            if whole:
                # The whole text has no content yet: what the streaming parser
                # took for content is reasoning to the whole-text split (an
                # end marker it saw as a token id, skipped from the text).
                self._more_reasoning = self._reasoning_rest(reasoning or "")
            return ""
        self._content_confirmed = True
        waiting, self._pending = self._pending, ""
        return so_far if whole else waiting

    def _reasoning_rest(self, reasoning: str) -> str:
        """The whole-text reasoning beyond what was sent, minus what may still
        change: a suffix that may begin the end marker, trailing whitespace."""
        sent = self._sent_reasoning
        if not reasoning.startswith(sent):
            return ""
        rest = reasoning[len(sent) :]
        rest = rest[: len(rest) - _partial_marker(rest, self._reasoning_marker_list)]
        return rest.rstrip() if self._strips_reasoning else rest

    def _whole_split(self, text: str) -> tuple[str | None, str | None]:
        extract = getattr(self._whole(), "extract_reasoning", None)
        if extract is None:
            return None, self._pending
        reasoning, content = extract(text, self.request)
        return _without_start(reasoning, self._reasoning_start), content

    def _whole(self) -> Any:
        return self._whole_parser

    # ---- the end ----------------------------------------------------------------

    def _finish(self) -> ChatPiece:
        """End of generation: what the whole-text reading has beyond what was sent."""
        text = "".join(self._chunks)
        if self.path in ("scan", "plain"):
            reasoning, content = self._split(text)
            piece = ChatPiece(reasoning=self._rest("reasoning", self._sent_reasoning, reasoning))
            if self._scanner is None:
                piece.content = self._rest("content", self._sent_content, content)
                return piece
            if not content.startswith(self._fed):
                # Streamed content the whole text does not have: it cannot be
                # taken back; the scanner reads on from where they agree.
                self._rest("content", self._fed, content)
                content = self._fed + content[_common(self._fed, content) :]
            merge(piece, self._scanner.feed(content[len(self._fed) :]))
            return merge(piece, self._scanner.finish())
        whole = self._parse(self._whole(), text)
        piece = ChatPiece(
            reasoning=self._rest("reasoning", self._sent_reasoning, whole.reasoning),
            content=self._rest("content", self._sent_content, whole.content),
        )
        for call in whole.tool_calls:
            sent = self._call_args.get(call.index)
            if sent is None:
                piece.tool_calls.append(call)
                continue
            rest = self._rest(f"tool call {call.index} arguments", sent, call.arguments)
            if rest:
                piece.tool_calls.append(ToolCallPiece(call.index, arguments=rest))
        return piece

    def _split(self, text: str) -> tuple[str, str]:
        """The whole text's (reasoning, content), as vLLM's whole-text path splits them."""
        if not self._has_reasoning:
            return "", text
        reasoning, content = self._whole_split(text)
        return reasoning or "", content or ""

    def _parse(self, parser: Any, text: str) -> ChatPiece:
        reasoning, content, calls = parser.parse(
            text, self.request, enable_auto_tools=True, model_output_token_ids=list(self._ids)
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

    @staticmethod
    def _rest(what: str, sent: str, whole: str) -> str:
        if whole.startswith(sent):
            return whole[len(sent) :]
        common = _common(sent, whole)
        # A parser whose stream and whole-text result disagree: the stream
        # cannot take text back. Request content stays out of the WARNING.
        log.warning(
            "streamed %s differs from the whole-text parse after %d characters "
            "(%d more were streamed): the rest of the whole-text result follows",
            what,
            common,
            len(sent) - common,
        )
        log.debug("streamed %r, whole %r", sent[common : common + 40], whole[common : common + 40])
        return whole[common:]

    # ---- engine and held paths --------------------------------------------------

    def _engine_calls(self, calls: list[ToolCallPiece]) -> list[ToolCallPiece]:
        """vLLM's engine parsers' call deltas as they come; what was sent is kept
        so the end sends only the rest. Calls that start before the content is
        confirmed wait for the end, whole."""
        if calls and not self._content_confirmed:
            self._holding = True
        if self._holding:
            return []
        for call in calls:
            if call.name:
                self._call_names[call.index] = call.name
                call.id = call.id or new_tool_call_id()
            self._call_args[call.index] = self._call_args.get(call.index, "") + call.arguments
        return calls

    def _held_content(self, content: str, call_started: bool) -> str:
        """Held path: content stops at the first call marker (calls wait for the
        end); a suffix that may begin a marker, or trailing whitespace, waits
        for the next delta."""
        if call_started:
            self._holding = True
        if self._holding:
            return ""
        text, self._tail = self._tail + content, ""
        cut = min((i for m in CALL_MARKERS if (i := text.find(m)) >= 0), default=-1)
        if cut >= 0:
            self._holding = True
            text = text[:cut]
        keep = _partial_marker(text, CALL_MARKERS) if cut < 0 else 0
        body = text[: len(text) - keep]
        out = body.rstrip()
        self._tail = text[len(out) :]
        return out

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

    def engine_kwargs(self, template_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """What vLLM's engine needs from the parsers for this request: where
        the reasoning ends (a grammar applies after it)."""
        parser, request = self._whole_parser, self.request
        if parser is None or request is None or getattr(parser, "reasoning_parser", None) is None:
            return {}
        return {
            "reasoning_ended": request.resolve_reasoning_ended(parser, self.prompt_token_ids),
            "reasoning_parser_kwargs": {"chat_template_kwargs": dict(template_kwargs)},
        }

    @property
    def plain(self) -> bool:
        """No parser and no logprobs: every delta's text is content as it
        comes, so a stream can skip `feed` and the ChatPiece (generation.run)."""
        return self._whole_parser is None and self.logprobs is None

    def chunk_logprobs(self) -> bytes:
        return self.logprobs.take_chunk() if self.logprobs is not None else b""

    def all_logprobs(self) -> bytes:
        return self.logprobs.whole() if self.logprobs is not None else b""


@dataclass(frozen=True)
class Parsers:
    """A loaded model's parser class and what its instances need; makes each
    request's `OutputState` (as vLLM's serving layer makes a parser per request)."""

    cls: Any | None  # vLLM's unified Parser class (None: no parsing)
    tokenizer: Any
    model_config: Any
    markers: Mapping[int, str]  # added-token id → text

    def output_state(
        self,
        chat: Any | None,
        template_kwargs: Mapping[str, Any],
        prompt_token_ids: Sequence[int],
        top_logprobs: int | None,
    ) -> OutputState:
        """`chat`: vLLM's ChatCompletionRequest (None for a raw prompt, whose
        output is all content)."""
        logprobs = None
        if top_logprobs is not None:
            tokenizer = self.tokenizer
            logprobs = LogprobsSink(top_logprobs, lambda i: tokenizer.decode([i]))
        cls = self.cls
        if cls is None or chat is None:
            return OutputState(None, None, logprobs=logprobs)
        kwargs = dict(template_kwargs)

        def new() -> Any:
            return cls(
                self.tokenizer,
                chat.tools,
                chat_template_kwargs=kwargs,
                model_config=self.model_config,
            )

        return OutputState(
            new, chat, logprobs=logprobs, markers=self.markers, prompt_token_ids=prompt_token_ids
        )


def _without_start(reasoning: str | None, start: str) -> str | None:
    """Reasoning without its opening marker: some whole-text splits (step3's)
    keep it when the model wrote it, though it is markup, never reasoning."""
    if reasoning and start and reasoning.startswith(start):
        return reasoning[len(start) :]
    return reasoning


def _after(sent: str, whole: str) -> str:
    return whole[len(sent) :] if whole.startswith(sent) else ""


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
