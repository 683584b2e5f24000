"""One JSON value read incrementally, written out as `json.dumps` would write it.

vLLM's JSON tool parsers return a call's arguments as
`json.dumps(json.loads(text), ensure_ascii=False)`: whitespace dropped,
escapes normalised, numbers re-printed. To stream those arguments while they
are generated, `JsonValue` is fed the model's text piece by piece and emits,
at every step, exactly the part of that serialization no later text can
change: a string's characters as they arrive, a number, literal or escape
sequence once it is complete, structure (`{`, `": "`, `, `, `]`) once its
token is read. Concatenated, the output equals the `json.dumps` of the whole
value (the property test in tests/unit/test_jsonvalue.py checks it over
generated documents and every cut).

Where it departs from `json.loads` + `json.dumps`: a key repeated in one object
is written twice (as the model wrote it) instead of keeping only the last
value — `json.loads` of either text gives the same object.

Why not a library: ijson emits a string only once it is complete (a long
argument would wait for its end), and the partial parsers (partial-json-parser,
jiter's partial mode) re-parse the whole text at each step, O(n²) over a
call, and do not say which part of their result is final.
"""

from __future__ import annotations

import json
import re

# Characters a JSON string may hold as they are (json.dumps with
# ensure_ascii=False writes them unchanged).
_PLAIN = re.compile(r'[^"\\\x00-\x1f]+')
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")
_WS = " \t\n\r"
_HEX = frozenset("0123456789abcdefABCDEF")
_SIMPLE_ESCAPES = {'"': '\\"', "\\": "\\\\", "/": "/", "b": "\\b", "f": "\\f", "n": "\\n"}
_SIMPLE_ESCAPES.update({"r": "\\r", "t": "\\t"})
_SIMPLE_DECODED = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r"}
_SIMPLE_DECODED["t"] = "\t"
# json.loads gives up (RecursionError) around here; a peer's nesting is bounded.
MAX_DEPTH = 512

# What the reader expects next (states of the container on top of the stack).
_VALUE = 0  # a value
_VALUE_OR_CLOSE = 1  # after "[": a value or "]"
_KEY_OR_CLOSE = 2  # after "{": a key or "}"
_KEY = 3  # after "," in an object
_COLON = 4
_AFTER = 5  # after a value: "," or the container's close


def dumps_char(ch: str) -> str:
    """`ch` as json.dumps(..., ensure_ascii=False) writes it inside a string."""
    if ch == '"' or ch == "\\":
        return "\\" + ch
    if ch >= " ":
        return ch
    return json.dumps(ch)[1:-1]


class JsonValue:
    """Feed text with `feed`; read what became certain with `take`.

    `done` is set when the value is complete (`feed` then returns where it
    ended: the rest of the text belongs to whatever encloses the value);
    `failed` when the text stopped being JSON (`feed` returns where; `pending`
    is what was read before that and not yet written: the model's text from
    `pending` on is what the output does not reflect). `raw_string`: a
    string at the top level is written decoded, without quotes (some parsers
    pass a string `arguments` through as it is).
    """

    __slots__ = (
        "_buf",
        "_esc",
        "_kind",
        "_out",
        "_raw_top",
        "_stack",
        "_state",
        "_strip",
        "done",
        "failed",
        "pending",
        "started",
        "string",
    )

    def __init__(self, *, raw_string: bool = False) -> None:
        self._out: list[str] = []
        self._stack: list[bool] = []  # True: object, False: array
        self._state = _VALUE
        self._kind = ""  # "" between tokens, else "str", "num", "lit"
        self._buf = ""  # source of an unfinished number, literal or escape
        self._esc = ""  # decoded high surrogate waiting for its low half
        self._raw_top = raw_string
        self._strip = False  # the current string is written decoded
        self.started = False  # the value's first character was read
        self.string = False  # the value is a string
        self.done = False
        self.failed = False
        self.pending = ""

    def take(self) -> str:
        out = "".join(self._out)
        self._out.clear()
        return out

    def feed(self, text: str, pos: int = 0) -> int:
        """Read from `text[pos:]`; return where reading stopped (len(text)
        unless the value ended or failed there)."""
        n = len(text)
        while pos < n and not self.done and not self.failed:
            kind = self._kind
            if kind == "str":
                pos = self._string(text, pos)
            elif kind:
                pos = self._scalar(text, pos)
            else:
                pos = self._token(text, pos)
        return pos

    def close(self) -> str:
        """End of the text with the value unfinished (a call cut by the token
        limit): the output so far plus what was pending, as written."""
        if not self.done and not self.failed:
            if self._kind in ("num", "lit") and self._complete_scalar():
                pass
            else:
                self._out.append(self._esc + self._buf)
            self._buf = self._esc = ""
        return self.take()

    # ---- tokens between values --------------------------------------------

    def _fail(self, text: str, pos: int) -> int:
        self.failed = True
        self.pending = self._esc + self._buf
        self._buf = self._esc = ""
        return pos

    def _token(self, text: str, pos: int) -> int:
        ch = text[pos]
        if ch in _WS:
            return pos + 1
        state = self._state
        if state in (_VALUE, _VALUE_OR_CLOSE):
            if state == _VALUE_OR_CLOSE and ch == "]":
                return self._close_container(False, pos)
            return self._start_value(text, pos)
        if state in (_KEY_OR_CLOSE, _KEY):
            if ch == '"':
                self._kind, self._strip = "str", False
                self._out.append('"')
                return pos + 1
            if state == _KEY_OR_CLOSE and ch == "}":
                return self._close_container(True, pos)
            return self._fail(text, pos)
        if state == _COLON:
            if ch != ":":
                return self._fail(text, pos)
            self._out.append(": ")
            self._state = _VALUE
            return pos + 1
        # _AFTER
        is_object = self._stack[-1]
        if ch == ",":
            self._out.append(", ")
            self._state = _KEY if is_object else _VALUE
            return pos + 1
        if ch == ("}" if is_object else "]"):
            return self._close_container(is_object, pos)
        return self._fail(text, pos)

    def _start_value(self, text: str, pos: int) -> int:
        ch = text[pos]
        self.started = True
        if ch == "{" or ch == "[":
            if len(self._stack) >= MAX_DEPTH:
                return self._fail(text, pos)
            self._stack.append(ch == "{")
            self._state = _KEY_OR_CLOSE if ch == "{" else _VALUE_OR_CLOSE
            self._out.append(ch)
            return pos + 1
        if ch == '"':
            self._kind = "str"
            self.string = not self._stack
            self._strip = self._raw_top and not self._stack
            if not self._strip:
                self._out.append('"')
            return pos + 1
        if ch in "-0123456789":
            self._kind = "num"
            return pos
        if ch in "tfnNI":
            self._kind = "lit"
            return pos
        return self._fail(text, pos)

    def _close_container(self, is_object: bool, pos: int) -> int:
        self._out.append("}" if is_object else "]")
        self._stack.pop()
        self._end_value()
        return pos + 1

    def _end_value(self) -> None:
        self._kind = ""
        if self._stack:
            self._state = _AFTER
        else:
            self.done = True

    # ---- strings ----------------------------------------------------------

    def _string(self, text: str, pos: int) -> int:
        n = len(text)
        while pos < n:
            if self._buf:  # inside an escape sequence
                pos = self._escape(text, pos)
                if self._buf or self.failed:
                    return pos
                continue
            run = _PLAIN.match(text, pos)
            if run is not None:
                if self._esc:  # a high surrogate not followed by its low half
                    self._emit(self._esc)
                    self._esc = ""
                self._out.append(run.group())
                pos = run.end()
                continue
            ch = text[pos]
            if ch == "\\":
                self._buf = "\\"
                pos += 1
                continue
            if self._esc:
                self._emit(self._esc)
                self._esc = ""
            if ch == '"':
                if not self._strip:
                    self._out.append('"')
                if self._state in (_KEY_OR_CLOSE, _KEY):
                    self._kind, self._state = "", _COLON
                else:
                    self._end_value()
                return pos + 1
            return self._fail(text, pos)  # a raw control character (json.loads is strict)
        return pos

    def _emit(self, ch: str) -> None:
        self._out.append(ch if self._strip else dumps_char(ch))

    def _escape(self, text: str, pos: int) -> int:
        """Continue the escape sequence in `_buf` ("\\" or "\\u..")."""
        buf = self._buf
        n = len(text)
        if len(buf) == 1:
            ch = text[pos]
            if ch == "u":
                buf, pos = "\\u", pos + 1
            else:
                simple = _SIMPLE_ESCAPES.get(ch)
                if simple is None:
                    return self._fail(text, pos)
                if self._esc:
                    self._emit(self._esc)
                    self._esc = ""
                self._out.append(_SIMPLE_DECODED[ch] if self._strip else simple)
                self._buf = ""
                return pos + 1
        take = min(6 - len(buf), n - pos)
        digits = text[pos : pos + take]
        if not all(c in _HEX for c in digits):
            self._buf = buf
            return self._fail(text, pos)
        buf += digits
        pos += take
        if len(buf) < 6:
            self._buf = buf
            return pos
        cp = int(buf[2:], 16)
        self._buf = ""
        if self._esc:
            high, self._esc = self._esc, ""
            if 0xDC00 <= cp <= 0xDFFF:
                both = 0x10000 + ((ord(high) - 0xD800) << 10) + (cp - 0xDC00)
                self._out.append(chr(both))
                return pos
            self._emit(high)
        if 0xD800 <= cp <= 0xDBFF:
            self._esc = chr(cp)  # wait: a low surrogate may follow
        else:
            self._emit(chr(cp))
        return pos

    # ---- numbers and literals ---------------------------------------------

    def _scalar(self, text: str, pos: int) -> int:
        n = len(text)
        start = pos
        if self._kind == "num":
            while pos < n and text[pos] in _NUMBER_CHARS:
                pos += 1
            self._buf += text[start:pos]
            if self._buf == "-" and pos < n and text[pos] == "I":
                self._kind = "lit"  # -Infinity
                return pos
            if pos == n:
                return pos
            if not self._complete_scalar():
                return self._fail(text, pos)
            return pos
        while pos < n and text[pos].isalpha():
            pos += 1
        self._buf += text[start:pos]
        buf = self._buf
        if buf in _LITERALS:
            self._complete_scalar()
            return pos
        if pos < n or not any(lit.startswith(buf) for lit in _LITERALS):
            return self._fail(text, pos)
        return pos

    def _complete_scalar(self) -> bool:
        buf = self._buf
        if self._kind == "num":
            if _NUMBER.fullmatch(buf) is None:
                return False
            try:
                # json's own reading and printing: ints stay exact, floats go
                # through float() and repr() (1E5 -> 100000.0), -0 -> 0.
                out = json.dumps(json.loads(buf))
            except ValueError:  # an int past Python's 4300-digit limit
                return False
        else:
            if buf not in _LITERALS:
                return False
            out = buf
        self._buf = ""
        self._out.append(out)
        self._end_value()
        return True
