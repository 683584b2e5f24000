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

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from backend.output.jsonvalue import JsonValue
from backend.output.pyvalue import PyValue
from backend.replies import ChatPiece, ToolCallPiece

_WS = " \t\r\n"

# DeepSeek's markers use FULLWIDTH VERTICAL LINE and LOWER ONE EIGHTH BLOCK.
DS_CALLS_BEGIN = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
DS_CALLS_END = "<\uff5ctool\u2581calls\u2581end\uff5c>"
DS_CALL_BEGIN = "<\uff5ctool\u2581call\u2581begin\uff5c>"
DS_CALL_END = "<\uff5ctool\u2581call\u2581end\uff5c>"
DS_SEP = "<\uff5ctool\u2581sep\uff5c>"
_DS_ARGS_END = "\n```" + DS_CALL_END


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


def new_tool_call_id() -> str:
    # vLLM's server format, so clients see the same shape of id.
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def partial_marker(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


class _Sink:
    """The piece being built for the caller, and the calls' numbering."""

    __slots__ = ("calls", "new_id", "piece")

    def __init__(self, new_id: Callable[[], str]) -> None:
        self.piece = ChatPiece()
        self.calls = 0
        self.new_id = new_id

    def start_call(self, name: str) -> int:
        index = self.calls
        self.calls += 1
        self.piece.tool_calls.append(ToolCallPiece(index, self.new_id(), name, ""))
        return index

    def args(self, index: int, text: str) -> None:
        if not text:
            return
        calls = self.piece.tool_calls
        if calls and calls[-1].index == index:
            calls[-1].arguments += text
        else:
            calls.append(ToolCallPiece(index, arguments=text))


# ---- bodies ---------------------------------------------------------------------
#
# A body reads a call region with feed(text, pos) -> pos (where it stopped:
# the end of `text`, or where its region body ended or failed) and sets
# `verdict` once it knows: "call" (a call went out, the region is markup from
# now on) or "text" (not a call: what it read is content). `in_args`: it
# failed inside a call's arguments (the rest is kept as those arguments);
# `pending`: text read before the failure that the output does not reflect.


class _Body:
    __slots__ = ("_index", "_sink", "done", "failed", "in_args", "pending", "verdict")
    owns_end = False  # the body reads its region's end marker itself

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink
        self._index = -1
        self.verdict = ""
        self.done = self.failed = self.in_args = False
        self.pending = ""

    def feed(self, text: str, pos: int) -> int:
        raise NotImplementedError

    def finish(self) -> None:
        """The output ended inside the region (a call cut by the token limit)."""

    def raw_args(self, text: str) -> None:
        self._sink.args(self._index, text)

    def _fail(self, pos: int, *, pending: str = "", in_args: bool = False) -> int:
        self.failed = True
        self.pending = pending
        self.in_args = in_args and self.verdict == "call"
        if self.verdict != "call":
            self.verdict = "text"
        return pos


class _ObjectCall(_Body):
    """{"name": ..., "arguments": ...}: one call written as a JSON object."""

    __slots__ = (
        "_args",
        "_first",
        "_fmt",
        "_name_first",
        "_read",
        "_role",
        "_seen_args",
        "_state",
        "_value",
    )

    def __init__(self, sink: _Sink, fmt: CallFormat, *, name_first: bool) -> None:
        super().__init__(sink)
        self._fmt = fmt
        self._name_first = name_first
        self._state = "open"  # open, key_or_close, key, key_read, colon, value, after
        self._value: JsonValue | None = None  # the key or value being read
        self._role = ""  # the value being read: "name", "args" or "" (another key)
        self._args: list[str] = []  # arguments read before the name
        self._seen_args = False
        self._first = True  # the next key is the object's first
        self._read: list[str] = []  # the key or name read so far

    def feed(self, text: str, pos: int) -> int:
        n = len(text)
        while pos < n and not self.done and not self.failed:
            state = self._state
            if state == "key" or state == "value":
                value = self._value
                assert value is not None
                pos = value.feed(text, pos)
                out = value.take()
                if state == "value" and self._role == "args":
                    self._write_args(out)
                elif state == "key" or self._role == "name":
                    self._read.append(out)
                if value.failed:
                    return self._fail(pos, pending=value.pending, in_args=self._role == "args")
                if value.done:
                    read = "".join(self._read)
                    self._read.clear()
                    if state == "key":
                        self._key(read)
                    else:
                        self._end_value(value, read)
                continue
            ch = text[pos]
            if ch in _WS:
                pos += 1
                continue
            if state == "open":
                if ch != "{":
                    return self._fail(pos)
                self._state = "key_or_close"
            elif ch == "}" and state in ("key_or_close", "after"):
                self._close()
            elif state in ("key_or_close", "key_next"):
                if ch != '"':
                    return self._fail(pos)
                self._value, self._state = JsonValue(raw_string=True), "key"
                continue
            elif state == "colon":
                if ch != ":":
                    return self._fail(pos)
                self._state = "value"
            elif state == "after" and ch == ",":
                self._state = "key_next"
            else:
                return self._fail(pos)
            pos += 1
        return pos

    def _key(self, key: str) -> None:
        if self._first and self._name_first and key != "name":
            self.verdict = "text"  # {"answer": ...} is not a call
        self._first = False
        if self.verdict == "text":
            self._role = ""
        elif key == "name" and self._index < 0:
            self._role = "name"
        elif key in self._fmt.arg_keys and not self._seen_args:
            self._role, self._seen_args = "args", True
        else:
            self._role = ""
        raw = self._role == "name" or (self._role == "args" and self._fmt.raw_string_args)
        self._value = JsonValue(raw_string=raw)
        self._state = "colon"

    def _end_value(self, value: JsonValue, out: str) -> None:
        if self._role == "name":
            if value.string:
                self._commit(out)
            else:
                self.verdict = "text"  # "name": 3 is no call
        self._value, self._state = None, "after"

    def _write_args(self, out: str) -> None:
        if self._index >= 0:
            self._sink.args(self._index, out)
        else:
            self._args.append(out)

    def _commit(self, name: str) -> None:
        self.verdict = "call"
        self._index = self._sink.start_call(name)
        self._sink.args(self._index, "".join(self._args))
        self._args.clear()

    def _close(self) -> None:
        self.done = True
        if self.verdict == "call" and not self._seen_args:
            self._sink.args(self._index, self._fmt.missing_args)
        if self.verdict != "call":
            self.verdict = "text"

    def finish(self) -> None:
        if self.verdict != "call":
            self.verdict = "text"
        elif self._state == "value" and self._role == "args" and self._value is not None:
            self._sink.args(self._index, self._value.close())


class _ListCalls(_Body):
    """[{...}, {...}]: calls written as a JSON list of objects."""

    __slots__ = ("_call", "_fmt", "_name_first", "_state")

    def __init__(self, sink: _Sink, fmt: CallFormat, *, name_first: bool) -> None:
        super().__init__(sink)
        self._fmt = fmt
        self._name_first = name_first
        self._state = "open"  # open, item_or_close, item, after, item_next
        self._call: _ObjectCall | None = None

    def feed(self, text: str, pos: int) -> int:
        n = len(text)
        while pos < n and not self.done and not self.failed:
            call = self._call
            if self._state == "item" and call is not None:
                pos = call.feed(text, pos)
                self._index = call._index
                if call.verdict and self.verdict != "call":
                    self.verdict = call.verdict
                if self.verdict == "text":
                    return self._fail(pos)  # the list is no list of calls: content
                if call.failed:
                    return self._fail(pos, pending=call.pending, in_args=call.in_args)
                if call.done:
                    self._state = "after"
                continue
            ch = text[pos]
            if ch in _WS:
                pos += 1
                continue
            if self._state == "open":
                if ch != "[":
                    return self._fail(pos)
                self._state = "item_or_close"
            elif self._state in ("item_or_close", "item_next") and ch == "{":
                name_first = self._name_first and self._call is None
                self._call = _ObjectCall(self._sink, self._fmt, name_first=name_first)
                self._state = "item"
                continue
            elif self._state == "after" and ch == ",":
                self._state = "item_next"
            elif self._state == "after" and ch == "]":
                self.done = True
                return pos + 1
            else:
                return self._fail(pos)
            pos += 1
        return pos

    def finish(self) -> None:
        if self._call is not None and self._state == "item":
            self._call.finish()
        if self.verdict != "call":
            self.verdict = "text"


_IDENT_START = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_IDENT_MORE = re.compile(r"[A-Za-z0-9_]*")


class _PythonCalls(_Body):
    """[name(key=value, ...), ...]: pythonic calls (Llama 3.2/4, ToolACE, SmolLM2).

    As vLLM's pattern requires: the name follows the bracket at once and starts
    with a letter, a keyword is followed by `=` at once; positional arguments
    are not read (the call fails there)."""

    __slots__ = ("_state", "_value", "_word")

    def __init__(self, sink: _Sink) -> None:
        super().__init__(sink)
        # open, name, kw_or_close, kw, value, after, kw_next_or_close, call_after, call_next
        self._state = "open"
        self._word = ""
        self._value: PyValue | None = None

    def feed(self, text: str, pos: int) -> int:
        n = len(text)
        args = self._sink.args
        while pos < n and not self.done and not self.failed:
            state = self._state
            if state == "value":
                value = self._value
                assert value is not None
                pos = value.feed(text, pos)
                args(self._index, value.take())
                if value.failed:
                    return self._fail(pos, pending=value.pending, in_args=True)
                if value.done:
                    self._state = "after"
                continue
            if state in ("name", "kw"):
                m = (_IDENT_MORE if self._word else _IDENT_START).match(text, pos)
                if m is not None:
                    self._word += m.group()
                    pos = m.end()
                if pos == n:
                    continue
                word, self._word = self._word, ""
                if state == "name":
                    if not word or text[pos] != "(":
                        return self._fail(pos)
                    self.verdict = "call"
                    self._index = self._sink.start_call(word)
                    args(self._index, "{")
                    self._state = "kw_or_close"
                else:
                    if not word or text[pos] != "=":
                        return self._fail(pos, pending=word, in_args=True)
                    args(self._index, json.dumps(word) + ": ")
                    self._value, self._state = PyValue(), "value"
                pos += 1
                continue
            ch = text[pos]
            if state == "open":
                if ch != "[":
                    return self._fail(pos)
                self._state = "name"
            elif ch in _WS:
                pass
            elif ch == ")" and state in ("kw_or_close", "after", "kw_next_or_close"):
                args(self._index, "}")
                self._state = "call_after"
            elif ch.isalpha() and state in ("kw_or_close", "kw_next_or_close"):
                if state == "kw_next_or_close":
                    args(self._index, ", ")
                self._state = "kw"
                continue
            elif ch == "," and state == "after":
                self._state = "kw_next_or_close"
            elif ch == "," and state == "call_after":
                self._state = "call_next"
            elif ch == "]" and state == "call_after":
                self.done = True
                return pos + 1
            elif state == "call_next":
                self._state = "name"
                continue
            else:
                return self._fail(pos, in_args=state not in ("call_after", "call_next"))
            pos += 1
        return pos

    def finish(self) -> None:
        if self.verdict != "call":
            self.verdict = "text"
        elif self._state == "value" and self._value is not None:
            self._sink.args(self._index, self._value.close())
        elif self._state == "kw":
            self._sink.args(self._index, self._word)


class _DeepSeekCalls(_Body):
    """DS_CALL_BEGIN TYPE DS_SEP NAME \\n```json\\n ARGS \\n``` DS_CALL_END, repeated, then
    DS_CALLS_END (DeepSeek V3 / R1).

    vLLM passes ARGS through as written; they are streamed so, minus a suffix
    that may begin the closing "\\n```" + DS_CALL_END."""

    __slots__ = ("_held", "_state")
    owns_end = True

    # What ends each part of a call, and the part that comes next.
    _PARTS: ClassVar[dict[str, tuple[str, str]]] = {
        "type": (DS_SEP, "name"),
        "name": ("\n", "fence"),
        "args": (_DS_ARGS_END, "begin"),
    }

    def __init__(self, sink: _Sink) -> None:
        super().__init__(sink)
        self._state = "begin"  # begin, type, name, fence, args
        self._held = ""  # text read but not decided (a marker may be starting)

    def feed(self, text: str, pos: int) -> int:
        held, self._held = self._held, ""
        buf = held + text[pos:]
        at = self._read(buf)
        # `at`: where in `buf` reading stopped; `buf` began len(held) before `pos`
        return max(pos, pos + at - len(held))

    def _read(self, buf: str) -> int:
        i, n = 0, len(buf)
        while i < n and not self.done and not self.failed:
            state = self._state
            if state == "begin":
                while i < n and buf[i] in _WS:
                    i += 1
                rest = buf[i:]
                if rest.startswith(DS_CALL_BEGIN):
                    i += len(DS_CALL_BEGIN)
                    self._state = "type"
                elif rest.startswith(DS_CALLS_END):
                    i += len(DS_CALLS_END)
                    self.done = True
                elif DS_CALL_BEGIN.startswith(rest) or DS_CALLS_END.startswith(rest):
                    self._held = rest
                    return n
                else:
                    return self._fail(i)
                continue
            if state == "fence":
                want = "```json\n"
                rest = buf[i : i + len(want)]
                if not want.startswith(rest):
                    return self._fail(i, in_args=True)
                if len(rest) < len(want):
                    self._held = rest
                    return n
                i += len(want)
                self._state = "args"
                continue
            stop, nxt = self._PARTS[state]
            at = buf.find(stop, i)
            if at < 0:
                keep = partial_marker(buf[i:], (stop,)) if state == "args" else n - i
                if state == "args":
                    self._sink.args(self._index, buf[i : n - keep])
                self._held = buf[n - keep :]
                return n
            part = buf[i:at]
            if state == "name":
                self.verdict = "call"
                self._index = self._sink.start_call(part)
            elif state == "args":
                self._sink.args(self._index, part)
            i = at + len(stop)
            self._state = nxt
        return i

    def finish(self) -> None:
        if self.verdict != "call":
            self.verdict = "text"
        elif self._state == "args":
            self._sink.args(self._index, self._held)


def _body(fmt: CallFormat, sink: _Sink, *, bare: bool) -> _Body:
    if fmt.body == "object":
        return _ObjectCall(sink, fmt, name_first=bare)
    if fmt.body == "list":
        return _ListCalls(sink, fmt, name_first=bare)
    if fmt.body == "python":
        return _PythonCalls(sink)
    return _DeepSeekCalls(sink)


class CallScanner:
    """Content in (post-reasoning text, piece by piece), what became certain out.

    `feed` returns a ChatPiece with the content and the tool-call pieces (index,
    id and name on a call's first piece, then argument fragments); `finish`
    ends the output. Fed the whole text at once, it gives the unary result.
    """

    def __init__(self, fmt: CallFormat, new_id: Callable[[], str] = new_tool_call_id) -> None:
        self._fmt = fmt
        self._sink = _Sink(new_id)
        self._mode = "text"  # text, region, after (a call's body ended), raw, skip
        self._buf = ""  # text fed and not read yet (a marker may be starting)
        self._ws = ""  # whitespace that is content only if content follows
        self._stretch = False  # the current stretch of content has more than whitespace
        self._start = True  # nothing but whitespace read yet
        self._calls = False  # a call went out
        self._body: _Body | None = None
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
        self._body = _body(self._fmt, self._sink, bare=bare)
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
