"""Tool calls found in the content as it is generated, their arguments streamed.

vLLM's legacy tool parsers (hermes, llama3_json, pythonic, xlam, phi4_mini_json,
deepseek_v3, granite4) read calls from the *whole* text; their streaming paths
re-parse partial JSON and disagree with the whole-text result on many outputs.
`CallScanner` reads the content once, left to right, and emits each byte of the
result the moment no later text can change it:

* content, except a suffix that may begin a call marker, whitespace that may
  turn out to sit between calls (dropped, as vLLM drops it), and text that may
  still be a bare call (`{` under llama3_json, `[` under pythonic and xlam)
  until its first key or name decides;
* a call's index, id and name once the name is complete;
* its arguments as `json.dumps` writes them (`JsonValue` / `PyValue`), or as the
  model wrote them where the parser passes them through (deepseek_v3, a named
  `tool_choice`).

`FORMATS` has one row per parser family: where its calls start and end and how
their body is written. The whole-text result is what the scanner gives for the
whole text in one piece, so a stream always concatenates to it. It equals
vLLM's whole-text result on well-formed output (tests/unit/test_stream_matrix.py
checks every format); where vLLM's rule cannot be streamed, it differs, on
purpose:

* a call whose name went out stays a call: cut by the token limit it keeps the
  arguments generated so far (as OpenAI returns a call cut by `length`); if its
  arguments stop being valid, the model's text from there to the call's end
  marker is kept as its arguments (vLLM turns the whole output into content);
* text before, between and after calls is content (vLLM's hermes keeps only
  the text before the first call, llama3_json and pythonic none of it);
* a bare JSON object or list is a call when its first key is `name`;
* `{"name": ...}` without arguments is a call with `{}`.
"""

from __future__ import annotations

from collections.abc import Callable

from backend.output.bodies import Body, Sink, make_body, new_tool_call_id, partial_marker
from backend.output.formats import FORMATS, REQUIRED, CallFormat, named
from backend.replies import ChatPiece

__all__ = ["FORMATS", "REQUIRED", "CallFormat", "CallScanner", "named", "new_tool_call_id"]

_WS = " \t\r\n"


class CallScanner:
    """Content in (post-reasoning text, piece by piece), what became certain out.

    `feed` returns a ChatPiece with the content and the tool-call pieces (index,
    id and name on a call's first piece, then argument fragments); `finish`
    ends the output. Fed the whole text at once, it gives the unary result.
    """

    def __init__(self, fmt: CallFormat, new_id: Callable[[], str] = new_tool_call_id) -> None:
        self._fmt = fmt
        self._sink = Sink(new_id)
        self._mode = "text"  # text, region, after (a call's body ended), raw, skip
        self._buf = ""  # text fed and not read yet (a marker may be starting)
        self._ws = ""  # whitespace that is content only if content follows
        self._stretch = False  # the current stretch of content has more than whitespace
        self._start = True  # nothing but whitespace read yet
        self._calls = False  # a call went out
        self._body: Body | None = None
        self._src: list[str] = []  # a region's text while it may still be content
        self._bare = False  # the region opened without a marker
        self._end = ""  # the closing marker of the region being read
        self._starts = tuple(start for start, _ in fmt.regions)
        self._ends = dict(fmt.regions)

    def feed(self, text: str) -> ChatPiece:
        if self._fmt.body == "raw":
            self._named(text)
        else:
            self._buf += text
            while self._buf and self._step():
                pass
        return self._take()

    def finish(self) -> ChatPiece:
        body, rest, self._buf = self._body, self._buf, ""
        if self._fmt.body == "raw":
            pass
        elif self._mode == "region" and body is not None:
            body.finish()
            if body.verdict == "text":
                self._text("".join(self._src) + rest)
        elif self._mode == "raw" and body is not None:
            body.raw_args(rest)
        elif self._mode in ("text", "skip"):
            self._text(rest)
        if self._ws and not self._calls:
            self._emit(self._ws)  # an answer that is whitespace only
        return self._take()

    # ---- modes: each reads from the front of self._buf; False: wait for more --

    def _step(self) -> bool:
        mode = self._mode
        if mode == "text":
            return self._scan_text()
        if mode == "region" or mode == "skip":
            return self._region()
        if mode == "after":
            return self._after_region()
        return self._raw()

    def _scan_text(self) -> bool:
        """Content, until a call region starts."""
        buf, fmt = self._buf, self._fmt
        if self._start and fmt.bare and not fmt.bare_anywhere:
            body = buf.lstrip(_WS) if fmt.bare_after_ws else buf
            if not body:
                return False  # only whitespace so far
            if any(m.startswith(body) for m in self._starts):
                return False  # a marker (like [TOOL_CALLS]) may be starting
            self._start = False
            if body[0] == fmt.bare and not body.startswith(self._starts):
                self._buf = body  # whitespace before a bare call is not content
                self._open(bare=True)
                return True
        first, marker = -1, ""
        for m in self._starts:
            at = buf.find(m)
            if at >= 0 and (first < 0 or at < first or (at == first and len(m) > len(marker))):
                first, marker = at, m
        if fmt.bare_anywhere:
            at = buf.find(fmt.bare)
            if at >= 0 and (first < 0 or at < first):
                first, marker = at, ""
        if first < 0:
            keep = partial_marker(buf, self._starts)
            self._text(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep :]
            return False
        self._text(buf[:first])
        self._buf = buf[first + len(marker) :]
        self._open(bare=not marker, marker=marker)
        return True

    def _open(self, *, bare: bool, marker: str = "") -> None:
        self._mode = "region"
        self._bare = bare
        self._end = self._ends.get(marker, "")
        self._body = make_body(self._fmt, self._sink, bare=bare)
        self._src = [marker]

    def _region(self) -> bool:
        body, buf = self._body, self._buf
        assert body is not None
        stop = body.feed(buf, 0)
        read, self._buf = buf[:stop], buf[stop:]
        if self._mode == "skip":
            self._text(read)
        elif body.verdict == "call":
            if self._src:  # the region's markup so far
                self._src = []
                self._calls, self._stretch = True, False
                if not self._fmt.keep_ws_between:
                    self._ws = ""
        else:
            self._src.append(read)
            if body.verdict == "text":
                self._text("".join(self._src))
                self._src = []
                if self._bare and self._fmt.bare_anywhere and not (body.done or body.failed):
                    # A bare object that is no call is content to its end, so
                    # a `{"name"` nested in it is not taken for a call.
                    self._mode = "skip"
                    return True
        if body.failed and body.in_args:
            self._mode = "raw"
            self._buf = body.pending + self._buf
        elif body.failed or body.verdict == "text" or (body.done and self._mode == "skip"):
            self._mode = "text"
        elif body.done:
            self._mode = "text" if body.owns_end else "after"
        return stop > 0 or self._mode != "region"

    def _after_region(self) -> bool:
        """After a call's body: whitespace, a separator or the end marker (markup)."""
        buf, fmt = self._buf, self._fmt
        rest = buf.lstrip(_WS)
        if not rest:
            return False
        for closing in (self._end, fmt.separator if self._bare else ""):
            if closing and rest.startswith(closing):
                self._buf = rest[len(closing) :]
                self._mode = "text"
                return True
            if closing and closing.startswith(rest):
                return False
        self._mode = "text"
        return True

    def _raw(self) -> bool:
        """A call's arguments past the point where they stopped being valid,
        as written, up to the call's end marker."""
        end, buf, body = self._end, self._buf, self._body
        assert body is not None
        at = buf.find(end) if end else -1
        if at < 0:
            keep = partial_marker(buf, (end,)) if end else 0
            body.raw_args(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep :]
            return False
        body.raw_args(buf[:at])
        self._buf = buf[at + len(end) :]
        self._mode = "text"
        return True

    def _named(self, text: str) -> None:
        """A named tool_choice: the content is the call's arguments, as written
        (vLLM makes no call of an empty or blank content)."""
        if not self._calls:
            self._buf += text
            if not self._buf.strip(_WS):
                return
            self._calls = True
            self._sink.start_call(self._fmt.name)
            text, self._buf = self._buf, ""
        self._sink.args(0, text)

    # ---- content ----------------------------------------------------------------

    def _text(self, text: str) -> None:
        """Content. Whitespace at the start of a stretch (after a call, or at
        the start) waits: a stretch of whitespace only next to calls is not
        content."""
        if not text:
            return
        if self._stretch:
            self._emit(text)
        elif not text.strip(_WS):
            self._ws += text
        else:
            self._emit(self._ws + text)
            self._ws, self._stretch = "", True

    def _emit(self, text: str) -> None:
        self._sink.piece.content += text

    def _take(self) -> ChatPiece:
        piece, self._sink.piece = self._sink.piece, ChatPiece()
        return piece
