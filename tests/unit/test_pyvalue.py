"""PyValue: Python literals streamed as the JSON vLLM's pythonic parsers return.

The reference is vLLM's own reading: `ast.parse` + `get_parameter_value` +
`json.dumps(..., ensure_ascii=False)`. Generated values are written as a
model might write them (either quote, escapes, implicit concatenation,
tuples, trailing commas, newlines inside brackets) and fed cut everywhere:
the output is a prefix of the reference at every step and equal at the end.
"""

from __future__ import annotations

import ast
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.output.pyvalue import PyValue

SETTINGS = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
_text = st.text(
    st.characters(codec="utf-16", exclude_categories=("Cs",))
    | st.sampled_from("'\"\\\n\t\x00é😀{"),
    max_size=10,
)
_keys = _text | st.integers(0, 100)  # vLLM refuses a signed key (not a Constant)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(_keys, inner, max_size=3)
    ),
    max_leaves=10,
)


def reference(source: str) -> str:
    from vllm.tool_parsers.utils import get_parameter_value

    node = ast.parse(source, mode="eval").body
    return json.dumps(get_parameter_value(node), ensure_ascii=False)


def _write(value, rnd: random.Random) -> str:
    def ws() -> str:
        return rnd.choice(["", "", " ", "\n  "])

    def string(s: str) -> str:
        quote = rnd.choice("'\"")
        out = []
        for ch in s:
            r = rnd.random()
            if ch in (quote, "\\") or ch < " " or ch == "\x7f":
                out.append(
                    {"\n": "\\n", "\t": "\\t"}.get(ch)
                    or (f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
                    if ch not in (quote, "\\")
                    else "\\" + ch
                )
            elif r < 0.1:
                out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
            else:
                out.append(ch)
        if len(out) > 1 and rnd.random() < 0.2:  # implicit concatenation, cut between characters
            cut = rnd.randrange(1, len(out))
            return f"{quote}{''.join(out[:cut])}{quote} {quote}{''.join(out[cut:])}{quote}"
        return quote + "".join(out) + quote

    if value is None or isinstance(value, bool):
        return rnd.choice([repr(value), json.dumps(value)])
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return string(value)
    trail = rnd.choice(["", "", ","])
    if isinstance(value, list):
        return (
            "["
            + ws()
            + ("," + ws()).join(_write(v, rnd) for v in value)
            + (trail if value else "")
            + "]"
        )
    if isinstance(value, tuple):
        return (
            "("
            + ", ".join(_write(v, rnd) for v in value)
            + ("," if len(value) == 1 else trail)
            + ")"
        )
    items = [_write(k, rnd) + ws() + ":" + ws() + _write(v, rnd) for k, v in value.items()]
    return "{" + ("," + ws()).join(items) + (trail if items else "") + "}"


def _feed(text: str, cuts: list[int]):
    value, out, steps, last = PyValue(), [], [], 0
    for cut in [*cuts, len(text)]:
        value.feed(text[last:cut])
        assert not value.failed, (text, value.pending)
        out.append(value.take())
        steps.append("".join(out))
        last = cut
    value.feed(")")  # what follows a keyword value in a call
    out.append(value.take())
    assert value.done
    return "".join(out), steps


@SETTINGS
@given(values, st.randoms(use_true_random=False))
def test_every_cut_streams_a_prefix_of_vllms_json_and_ends_equal(value, rnd):
    text = _write(value, rnd)
    want = reference(text)
    got, steps = _feed(text, list(range(1, len(text))))
    for step in steps:
        assert want.startswith(step), (text, step, want)
    assert got == want, text


@pytest.mark.parametrize(
    "text",
    [
        "-1",
        "- 2.5",
        "1e-5",
        "0x1F",
        "1_000",
        ".5",
        "True",
        "null",
        "(1)",
        "()",
        "(1,)",
        "{1, 2}",
        "{}",
        "{'a': {1: None}}",
        "r'a\\'b\\d'",
        "u'x'",
        "'\\N{BULLET}'",
        "'\\101\\x41'",
        "'a' \"b\"",
        "'\\q'",
    ],
)
def test_spellings(text):
    got, _ = _feed(text, list(range(1, len(text))))
    assert got == reference(text)


@pytest.mark.parametrize("text", ["f'x{y}'", "b'x'", "x", "1j", "'''a\nb'''", "'a\nb'", "[1 2]"])
def test_what_vllm_refuses_fails(text):
    value = PyValue()
    value.feed(text + ")")
    assert value.failed
