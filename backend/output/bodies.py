"""Call-region bodies: the inside of a region, read incrementally (see calls.py).

A body reads a call region with feed(text, pos) -> pos (where it stopped:
the end of `text`, or where its region body ended or failed) and sets
`verdict` once it knows: "call" (a call went out, the region is markup from
now on) or "text" (not a call: what it read is content). `in_args`: it
failed inside a call's arguments (the rest is kept as those arguments);
`pending`: text read before the failure that the output does not reflect.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import ClassVar

from backend.output.formats import (
    DS_ARGS_END,
    DS_CALL_BEGIN,
    DS_CALLS_END,
    DS_SEP,
    CallFormat,
)
from backend.output.jsonvalue import JsonValue
from backend.output.pyvalue import PyValue
from backend.replies import ChatPiece, ToolCallPiece

_WS = " \t\r\n"


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


class Sink:
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


class Body:
    __slots__ = ("_index", "_sink", "done", "failed", "in_args", "pending", "verdict")
    owns_end = False  # the body reads its region's end marker itself

    def __init__(self, sink: Sink) -> None:
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


class _ObjectCall(Body):
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

    def __init__(self, sink: Sink, fmt: CallFormat, *, name_first: bool) -> None:
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


class _ListCalls(Body):
    """[{...}, {...}]: calls written as a JSON list of objects."""

    __slots__ = ("_call", "_fmt", "_name_first", "_state")

    def __init__(self, sink: Sink, fmt: CallFormat, *, name_first: bool) -> None:
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


class _PythonCalls(Body):
    """[name(key=value, ...), ...]: pythonic calls (Llama 3.2/4, ToolACE, SmolLM2).

    As vLLM's pattern requires: the name follows the bracket at once and starts
    with a letter, a keyword is followed by `=` at once; positional arguments
    are not read (the call fails there)."""

    __slots__ = ("_state", "_value", "_word")

    def __init__(self, sink: Sink) -> None:
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


class _DeepSeekCalls(Body):
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
        "args": (DS_ARGS_END, "begin"),
    }

    def __init__(self, sink: Sink) -> None:
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


def make_body(fmt: CallFormat, sink: Sink, *, bare: bool) -> Body:
    if fmt.body == "object":
        return _ObjectCall(sink, fmt, name_first=bare)
    if fmt.body == "list":
        return _ListCalls(sink, fmt, name_first=bare)
    if fmt.body == "python":
        return _PythonCalls(sink)
    return _DeepSeekCalls(sink)
