"""JsonValue: streamed output == json.dumps(json.loads(text)), and nothing is taken back.

Generated JSON documents, written with random whitespace, escapes (\\uXXXX,
surrogate pairs, \\/) and number spellings (1E5, 0.50, -0), are fed cut at
every position (and in random pieces): at each step the output so far must be
a prefix of `json.dumps(json.loads(text), ensure_ascii=False)` — what vLLM's
JSON tool parsers return — and at the end equal to it.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.output.jsonvalue import MAX_DEPTH, JsonValue

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

_text = st.text(
    st.characters(codec="utf-16", exclude_categories=("Cs",)) | st.sampled_from('"\\/\n\t\x00é😀'),
    max_size=12,
)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)


def _write(value, rnd: random.Random) -> str:
    """`value` as JSON text a model might write: random whitespace and escapes."""

    def ws() -> str:
        return rnd.choice(["", "", " ", "\n", "  ", "\t"])

    def string(s: str) -> str:
        out = []
        for ch in s:
            r = rnd.random()
            if ch in '"\\' or ch < " ":
                out.append(json.dumps(ch)[1:-1] if r < 0.7 else f"\\u{ord(ch):04x}")
            elif ch == "/" and r < 0.5:
                out.append("\\/")
            elif r < 0.15:
                enc = ch.encode("utf-16-be")
                out.extend(
                    f"\\u{int.from_bytes(enc[i : i + 2], 'big'):04X}" for i in range(0, len(enc), 2)
                )
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'

    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        spelled = repr(value)
        if rnd.random() < 0.3 and "e" not in spelled and "inf" not in spelled:
            spelled = f"{value:e}"
        return spelled
    if isinstance(value, str):
        return string(value)
    if isinstance(value, list):
        return "[" + ws() + ("," + ws()).join(_write(v, rnd) + ws() for v in value) + "]"
    items = [ws() + string(k) + ws() + ":" + ws() + _write(v, rnd) + ws() for k, v in value.items()]
    return "{" + ",".join(items) + ws() + "}"


def _feed(text: str, cuts: list[int]) -> tuple[str, list[str]]:
    value, out, steps = JsonValue(), [], []
    last = 0
    for cut in [*cuts, len(text)]:
        end = value.feed(text[last:cut])
        assert end == cut - last or value.done or value.failed
        out.append(value.take())
        steps.append("".join(out))
        last = cut
    out.append(value.close())  # the end of the text ends a top-level number
    return "".join(out), steps


@SETTINGS
@given(values, st.randoms(use_true_random=False))
def test_every_cut_streams_a_prefix_of_json_dumps_and_ends_equal(value, rnd):
    text = _write(value, rnd)
    want = json.dumps(json.loads(text), ensure_ascii=False)
    # one character at a time: every intermediate output is a prefix
    got, steps = _feed(text, list(range(1, len(text))))
    for step in steps:
        assert want.startswith(step), (text, step, want)
    assert got == want, text
    # random pieces
    cuts = sorted(rnd.sample(range(1, len(text)), min(len(text) - 1, rnd.randint(0, 5))))
    assert _feed(text, cuts)[0] == want


@pytest.mark.parametrize(
    ("text", "held"),
    [
        ('{"n": 12', '{"n": '),  # 12 may become 123 or 12.5
        ('{"s": "caf\\u00', '{"s": "caf'),  # an escape waits for its end
        ('{"s": "\\ud83d', '{"s": "'),  # a high surrogate waits for its low half
        ('{"b": tr', '{"b": '),
        ('{"a": "Par', '{"a": "Par'),  # string characters go out as they come
        ('{"a": 1,', '{"a": 1, '),
        ("[1.50", "["),
    ],
)
def test_what_waits_and_what_goes_out(text, held):
    value = JsonValue()
    value.feed(text)
    assert value.take() == held


def test_a_number_ends_at_its_delimiter_and_the_rest_is_left_to_the_caller():
    value = JsonValue()
    text = '{"a": 1E5}\n</tool_call>'
    end = value.feed(text)
    assert value.done and text[end:] == "\n</tool_call>"
    assert value.take() == '{"a": 100000.0}'


@pytest.mark.parametrize(
    ("text", "out", "rest"),
    [
        ('{"a": 1,}', '{"a": 1, ', "}"),
        ('{"a": "x\ny"}', '{"a": "x', '\ny"}'),  # raw control character: json.loads is strict
        ('{"a": 01}', '{"a": ', "01}"),
        ('{"a": \\q}', '{"a": ', "\\q}"),
        ('["\\x41"]', '["', '\\x41"]'),
    ],
)
def test_text_that_stops_being_json_fails_where_it_stops(text, out, rest):
    value = JsonValue()
    value.feed(text)
    assert value.failed and not value.done
    end = len(text) - len(rest) + len(value.pending)
    assert value.take() == out
    assert value.pending + text[end:] == rest
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_nesting_is_bounded():
    value = JsonValue()
    value.feed("[" * (MAX_DEPTH + 5))
    assert value.failed


def test_a_top_level_string_can_be_written_decoded():
    value = JsonValue(raw_string=True)
    end = value.feed('"{\\"city\\": \\"Par\\u00eds\\"}" tail')
    assert value.done and value.take() == '{"city": "París"}'
    assert end == len('"{\\"city\\": \\"Par\\u00eds\\"}"')


def test_close_flushes_a_cut_value_as_written():
    value = JsonValue()
    value.feed('{"n": 12')
    assert value.take() == '{"n": '
    assert value.close() == "12"
