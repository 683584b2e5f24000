"""One Python literal read incrementally, written out as JSON (pythonic tool calls).

vLLM's pythonic parsers read `[get_weather(city="Paris"), ...]` with `ast` and
return each call's keyword arguments as `json.dumps(values, ensure_ascii=False)`
(`vllm.tool_parsers.utils.get_parameter_value`: str, int, float, bool, None,
the JSON names true/false/null, lists, tuples and sets as lists, dicts, a sign
before a number). `PyValue` is fed the model's text piece by piece and emits
the part of that JSON no later text can change, as `JsonValue` does for JSON:
a string's characters as they come, the rest token by token.

Where the next token decides what was before it, the output waits for it:
the closing quote of a string (`'a' 'b'` is one string), a separator (`[1, 2,]`
has a trailing comma), the first element of `{`/`(` (a dict or a set, a tuple
or a parenthesized value). Triple-quoted, byte and formatted strings are not
read (the value fails: what is left is the model's own text).
"""

from __future__ import annotations

import ast
import json
import re
import unicodedata

from backend.output.jsonvalue import MAX_DEPTH, dumps_char

_WS = " \t\r\n"
_PLAIN_SQ = re.compile(r"[^'\\\n\r]+")
_PLAIN_DQ = re.compile(r'[^"\\\n\r]+')
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME_MORE = re.compile(r"[A-Za-z0-9_]*")
_NUMBER_START = frozenset("0123456789.")
_NUMBER_CHARS = re.compile(r"[0-9A-Za-z_.]*")
_NAMES = {"True": "true", "False": "false", "None": "null"}
_NAMES.update({"true": "true", "false": "false", "null": "null"})
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f", "n": "\n"}
_ESCAPES.update({"r": "\r", "t": "\t", "v": "\v"})
_HEX = frozenset("0123456789abcdefABCDEF")

# Containers. PENDING_*: the first element decides what the container is.
_LIST, _TUPLE, _DICT, _SET, _PAREN, _PENDING_BRACE, _PENDING_PAREN = range(7)
_CLOSE = {_LIST: "]", _TUPLE: ")", _DICT: "}", _SET: "}", _PAREN: ")"}
_CLOSE[_PENDING_BRACE] = "}"
_CLOSE[_PENDING_PAREN] = ")"
# What comes next in the container on top of the stack.
_VALUE, _VALUE_OR_CLOSE, _COLON, _AFTER = range(4)


class PyValue:
    """Feed text with `feed`, read the JSON output with `take`; `done`,
    `failed` and `pending` as in `JsonValue`."""

    __slots__ = (
        "_buf",
        "_keys",
        "_kind",
        "_outs",
        "_quote",
        "_raw",
        "_sep",
        "_src",
        "_stack",
        "_state",
        "_step",
        "_string_closed",
        "done",
        "failed",
        "pending",
        "started",
    )

    def __init__(self) -> None:
        self._outs: list[list[str]] = [[]]  # the last list takes output
        self._stack: list[list[int]] = []  # [container kind, index of its output list]
        self._keys: list[bool] = []  # per container: the value being read is a dict key
        self._state = _VALUE
        self._kind = ""  # "" between tokens, "str", "num", "name"
        self._buf = ""
        self._src = ""  # the text read since the oldest buffered element began
        self._step = 0
        self._quote = ""
        self._raw = False
        self._sep = False  # a "," read, its ", " not written yet
        self._string_closed = False  # a string ended; another may continue it
        self.started = False
        self.done = False
        self.failed = False
        self.pending = ""

    def take(self) -> str:
        out = "".join(self._outs[0])  # buffered elements wait until they are decided
        self._outs[0].clear()
        return out

    def feed(self, text: str, pos: int = 0) -> int:
        n = len(text)
        while pos < n and not self.done and not self.failed:
            self._step = pos
            held = len(self._outs) > 1
            if self._kind == "str":
                end = self._string(text, pos)
            elif self._kind:
                end = self._scalar(text, pos)
            else:
                end = self._token(text, pos)
            if self.failed:
                break
            if held or len(self._outs) > 1:
                self._src += text[pos:end]
            if len(self._outs) == 1:
                self._src = ""
            pos = end
        return pos

    def close(self) -> str:
        """End of text with the value unfinished: output so far plus the rest as written."""
        if self.done or self.failed:
            return self.take()
        if self._string_closed and not self._stack:
            self._write('"')
            self._string_closed = False
            self.done = True
        pending = self._buf
        self._buf = ""
        out = "".join("".join(part) for part in self._outs)
        self._outs = [[]]
        return out + pending

    # ---- output -----------------------------------------------------------

    def _write(self, s: str) -> None:
        self._outs[-1].append(s)

    def _fail(self, text: str, pos: int) -> int:
        """`feed` returns where; `pending`: what was read before and not written."""
        self.failed = True
        if len(self._outs) > 1:
            self.pending = self._src + text[self._step : pos]
            self._outs = self._outs[:1]
        else:
            self.pending = self._buf
        self._buf = self._src = ""
        return pos

    # ---- between tokens ---------------------------------------------------

    def _token(self, text: str, pos: int) -> int:
        ch = text[pos]
        if ch in _WS:
            return pos + 1
        if self._string_closed:
            self._string_closed = False
            if ch in "'\"":  # implicit concatenation: the same string goes on
                self._kind, self._quote = "str", ch
                return pos + 1
            self._write('"')
            self._after_value()
            if self.done:
                return pos
        state = self._state
        if state == _AFTER:
            return self._after(text, pos)
        if state == _COLON:
            if ch != ":":
                return self._fail(text, pos)
            self._write(": ")
            self._keys[-1] = False
            self._state = _VALUE
            return pos + 1
        if state == _VALUE_OR_CLOSE and self._stack and ch == _CLOSE[self._stack[-1][0]]:
            self._sep = False
            return self._close(text, pos)
        return self._start_value(text, pos)

    def _start_value(self, text: str, pos: int) -> int:
        ch = text[pos]
        self.started = True
        if self._sep:
            self._write(", ")
            self._sep = False
        if ch in "[({":
            if len(self._stack) >= MAX_DEPTH:
                return self._fail(text, pos)
            if ch == "[":
                self._stack.append([_LIST, 0])
                self._write("[")
            else:
                self._outs.append([])  # buffered until the first element decides
                kind = _PENDING_BRACE if ch == "{" else _PENDING_PAREN
                self._stack.append([kind, len(self._outs) - 1])
            self._keys.append(False)
            self._state = _VALUE_OR_CLOSE
            return pos + 1
        if ch in "'\"":
            return self._start_string(ch, pos + 1)
        if ch in "-+" or ch in _NUMBER_START:
            self._kind = "num"
            return pos
        if ch.isalpha() or ch == "_":
            self._kind = "name"
            return pos
        return self._fail(text, pos)

    def _start_string(self, quote: str, pos: int, raw: bool = False) -> int:
        self._kind, self._quote, self._raw = "str", quote, raw
        self._write('"')
        return pos

    def _after(self, text: str, pos: int) -> int:
        ch = text[pos]
        kind = self._stack[-1][0]
        if ch == ",":
            self._resolve_pending(_SET if kind == _PENDING_BRACE else _TUPLE)
            self._sep = True
            self._keys[-1] = self._stack[-1][0] == _DICT
            self._state = _VALUE_OR_CLOSE
            return pos + 1
        if ch == ":" and kind in (_PENDING_BRACE, _DICT) and self._keys[-1]:
            self._resolve_pending(_DICT)
            self._state = _COLON
            return pos
        if ch == _CLOSE[kind]:
            return self._close(text, pos)
        return self._fail(text, pos)

    def _resolve_pending(self, kind: int) -> None:
        top = self._stack[-1]
        if top[0] not in (_PENDING_BRACE, _PENDING_PAREN):
            return
        held = self._outs.pop()
        top[0] = kind
        if kind == _DICT:
            # the first element was a key: written as a JSON string
            key = "".join(held)
            self._write("{" + (key if key.startswith('"') else json.dumps(key)))
        else:
            self._write(("[" if kind != _PAREN else "") + "".join(held))

    def _close(self, text: str, pos: int) -> int:
        kind = self._stack[-1][0]
        if kind == _PENDING_BRACE:
            if self._state == _VALUE_OR_CLOSE:
                self._outs.pop()
                self._stack[-1][0] = _DICT
                self._write("{")
            else:
                self._resolve_pending(_SET)
        elif kind == _PENDING_PAREN:
            if self._state == _VALUE_OR_CLOSE:  # () is an empty tuple
                self._outs.pop()
                self._stack[-1][0] = _TUPLE
                self._write("[")
            else:
                self._resolve_pending(_PAREN)
        kind = self._stack.pop()[0]
        self._keys.pop()
        if kind != _PAREN:
            self._write("]" if kind in (_LIST, _TUPLE, _SET) else "}")
        self._after_value()
        return pos + 1

    def _after_value(self) -> None:
        self._kind = ""
        if not self._stack:
            self.done = True
            return
        self._state = _AFTER
        top = self._stack[-1]
        if top[0] == _PENDING_BRACE and self._keys[-1] is False and len(self._outs) - 1 == top[1]:
            self._keys[-1] = True  # the first element of "{" may be a key

    # ---- strings ------------------------------------------------------------

    def _string(self, text: str, pos: int) -> int:
        quote = self._quote
        plain = _PLAIN_SQ if quote == "'" else _PLAIN_DQ
        n = len(text)
        while pos < n:
            if self._buf:
                pos = self._escape(text, pos)
                if self._buf or self.failed:
                    return pos
                continue
            run = plain.match(text, pos)
            if run is not None:
                self._write(
                    "".join(map(dumps_char, run.group())) if _needs(run.group()) else run.group()
                )
                pos = run.end()
                continue
            ch = text[pos]
            if ch == quote:
                self._kind = ""
                self._string_closed = True  # its '"' waits: 'a' 'b' is one string
                return pos + 1
            if ch == "\\":
                self._buf = "\\"
                pos += 1
                continue
            return self._fail(text, pos)  # a newline in a one-line string
        return pos

    def _escape(self, text: str, pos: int) -> int:
        buf = self._buf
        n = len(text)
        while pos < n:
            buf += text[pos]
            pos += 1
            done: bool | None
            if self._raw:  # r'..': the backslash stays, and keeps the next character
                done, value, extra = True, buf, 0
            else:
                done, value, extra = _decode_escape(buf)
            if done is None:
                self._buf = buf
                return self._fail(text, pos)
            if done:
                self._buf = ""
                self._write("".join(map(dumps_char, value)))
                return pos - extra
        self._buf = buf
        return pos

    # ---- numbers and names ---------------------------------------------------

    def _scalar(self, text: str, pos: int) -> int:
        n = len(text)
        if self._kind == "name":
            m = (_NAME_MORE if self._buf else _NAME).match(text, pos)
            assert m is not None
            self._buf += m.group()
            pos = m.end()
            if pos == n:
                return pos
            name = self._buf
            if pos < n and text[pos] in "'\"" and name.lower() in ("u", "r"):
                self._buf = ""
                return self._start_string(text[pos], pos + 1, raw=name.lower() == "r")
            if name not in _NAMES:
                return self._fail(text, pos)
            self._buf = ""
            self._write(_NAMES[name] if not self._key_now() else json.dumps(_NAMES[name]))
            self._after_value()
            return pos
        while pos < n and (text[pos] in "+-" or text[pos] in " \t") and not self._digits():
            self._buf += text[pos]
            pos += 1
        while pos < n:
            m = _NUMBER_CHARS.match(text, pos)
            assert m is not None
            self._buf += m.group()
            pos = m.end()
            # an exponent's sign (1e-5), not a subtraction after a hex number
            if (
                pos < n
                and text[pos] in "+-"
                and self._buf[-1:] in ("e", "E")
                and not _is_hex(self._buf)
            ):
                self._buf += text[pos]
                pos += 1
                continue
            break
        if pos == n:
            return pos
        return self._end_number(text, pos)

    def _digits(self) -> bool:
        return bool(self._buf.lstrip("+- \t"))

    def _end_number(self, text: str, pos: int) -> int:
        buf = self._buf
        try:
            value = ast.literal_eval(buf.replace(" ", "").replace("\t", ""))
        except (ValueError, SyntaxError, TypeError, MemoryError):
            return self._fail(text, pos)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return self._fail(text, pos)
        self._buf = ""
        out = json.dumps(value)
        self._write(json.dumps(out) if self._key_now() else out)
        self._after_value()
        return pos

    def _key_now(self) -> bool:
        return bool(self._keys) and self._keys[-1] and self._stack[-1][0] == _DICT


def _needs(run: str) -> bool:
    return '"' in run or any(c < " " for c in run)


def _is_hex(number: str) -> bool:
    return number.lstrip("+- \t")[:2].lower() == "0x"


def _decode_escape(seq: str) -> tuple[bool | None, str, int]:
    """For `seq` ("\\..."): (True, decoded, n) when it is a whole Python escape
    (its last `n` characters are not part of it), (False, "", 0) when more may
    follow, (None, "", 0) when it cannot be one."""
    if len(seq) < 2:
        return False, "", 0
    kind = seq[1]
    if kind in _ESCAPES:
        return True, _ESCAPES[kind], 0
    if kind == "\n":
        return True, "", 0  # a line continuation
    if kind in "01234567":
        digits = seq[1:]
        if all(c in "01234567" for c in digits):
            if len(digits) < 3:
                return False, "", 0  # up to three octal digits
            return True, chr(int(digits, 8)), 0
        return True, chr(int(digits[:-1], 8)), 1
    width = {"x": 2, "u": 4, "U": 8}.get(kind)
    if width is not None:
        digits = seq[2:]
        if not all(c in _HEX for c in digits):
            return None, "", 0
        if len(digits) < width:
            return False, "", 0
        cp = int(digits, 16)
        return (True, chr(cp), 0) if cp <= 0x10FFFF else (None, "", 0)
    if kind == "N":
        if len(seq) == 2:
            return False, "", 0
        if seq[2] != "{" or len(seq) > 100:
            return None, "", 0
        if not seq.endswith("}"):
            return False, "", 0
        try:
            return True, unicodedata.lookup(seq[3:-1]), 0
        except KeyError:
            return None, "", 0
    return True, "\\" + kind, 0  # unknown escapes stay as written
