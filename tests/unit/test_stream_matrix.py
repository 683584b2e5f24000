"""Streamed == unary, as soon as certain: parser x output format x chunking, vLLM's parsers.

For every (tool, reasoning) parser pair the family table can choose (plus
xlam and pythonic, which gateways name explicitly), on outputs in every
common call format, with the markers as plain added tokens, as *special*
added tokens (skipped from the text when the parser asks for
skip_special_tokens) and as plain text, with the think block opened in the
prompt and not, cut into engine deltas of 1, 2, 3, 5, 8 tokens and whole:

1. the concatenated streamed reasoning, content and each call's name and
   arguments equal the unary result (the same output in one delta), each name
   is sent once, and no marker text leaks into streamed content or reasoning;
2. the unary result equals vLLM's own whole-text parse, except the cells in
   `DEPARTURES`, each with the reason the worker's rule differs;
3. the stream held back little: bytes of the result that reached the client
   later than the first delta after which they were determined (the whole-text
   results of the text so far with the real rest and with `CONTINUATIONS`
   agree on them) are at most one delta's worth plus the closing syntax,
   except the parsers in `HELD` (they stream no calls, and say why).
   The worst cell per parser is printed (`-s`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import vllm  # noqa: F401  (explicit: the matrix runs vLLM's real parsers)

from backend.output.state import OutputState
from tests.stream_driver import (
    Streamed,
    added_markers,
    fields_of,
    held_back,
    known_after_each_delta,
    parser_class,
    stream,
)
from tests.tokenizer_variants import tokenizer_variant

# DeepSeek's markers use FULLWIDTH VERTICAL LINE and LOWER ONE EIGHTH BLOCK.
BAR, LOW = "\uff5c", "\u2581"
DS_CALLS_BEGIN = f"<{BAR}tool{LOW}calls{LOW}begin{BAR}>"
DS_CALLS_END = f"<{BAR}tool{LOW}calls{LOW}end{BAR}>"
DS_CALL_BEGIN = f"<{BAR}tool{LOW}call{LOW}begin{BAR}>"
DS_CALL_END = f"<{BAR}tool{LOW}call{LOW}end{BAR}>"
DS_SEP = f"<{BAR}tool{LOW}sep{BAR}>"
DEEPSEEK = [DS_CALLS_BEGIN, DS_CALLS_END, DS_CALL_BEGIN, DS_CALL_END, DS_SEP]
EXTRA_MARKERS = [
    "<|python_tag|>",
    "[TOOL_CALLS]",
    "<|tool_call|>",
    "[THINK]",
    "[/THINK]",
    *DEEPSEEK,
]
TINY_MARKERS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
LEAKS = [
    "<tool_call",
    "</tool_call",
    "<think",
    "</think",
    "[TOOL_CALLS",
    "<|python_tag",
    "<|tool_call",
]

LONG = 'Paris, "Île-de-France"\\ — la Ville Lumière, 75001 \\u00e9t\\u00e9 ☀'
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def _obj(city="Paris"):
    return f'{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}'


def _params(city="Paris"):
    return f'{{"name": "get_weather", "parameters": {{"city": "{city}"}}}}'


def _deepseek(city="Paris"):
    args = f'```json\n{{"city": "{city}"}}\n```'
    return f"{DS_CALL_BEGIN}function{DS_SEP}get_weather\n{args}{DS_CALL_END}"


def _coder(city="Paris"):
    return (
        f"<tool_call>\n<function=get_weather>\n<parameter=city>\n{city}\n"
        "</parameter>\n</function>\n</tool_call>"
    )


FORMATS = {
    "hermes object": f"<tool_call>\n{_obj()}\n</tool_call>",
    "hermes parallel": (
        f"<tool_call>\n{_obj()}\n</tool_call>\n<tool_call>\n{_obj('Rome')}\n</tool_call>"
    ),
    "hermes list": f"<tool_call>[{_obj()}]</tool_call>",
    "hermes cut by Tokens": '<tool_call>\n{"name": "get_weather", "arguments": {"ci',
    "xlam list": f"[{_obj()}]",
    "xlam parallel": f"[{_obj()}, {_obj('Rome')}]",
    "xlam object": _obj(),
    "llama3 python_tag": f"<|python_tag|>{_params()}",
    "llama3 bare": _params(),
    "llama3 parallel": f"{_params()}; {_params('Rome')}",
    "pythonic": '[get_weather(city="Paris")]',
    "pythonic parallel": '[get_weather(city="Paris"), get_weather(city="Rome")]',
    "mistral": f"[TOOL_CALLS][{_obj()}]",
    "granite": f"<|tool_call|>[{_obj()}]",
    "phi4": f"functools[{_obj()}]",
    "qwen3_coder": _coder(),
    "qwen3_coder parallel": _coder() + "\n" + _coder("Rome"),
    "deepseek": f"{DS_CALLS_BEGIN}{_deepseek()}{DS_CALLS_END}",
    "fenced json": f"```json\n[{_obj()}]\n```",
    "plain text": "Just text, with {braces} and [brackets] and ünïcode.",
    "text then call": f"Let me check.\n\n<tool_call>\n{_obj()}\n</tool_call>",
    # arguments long enough to stream: escapes, unicode, numbers, nesting
    "hermes long": "<tool_call>\n"
    + json.dumps({"name": "get_weather", "arguments": {"city": LONG, "days": 3.50, "opts": [1, 2]}})
    + "\n</tool_call>",
    "pythonic long": f"[get_weather(city={LONG!r}, days=3.50)]",
    # an answer shaped like JSON while tools are offered: no call
    "json answer": '{"answer": "Paris is the capital of France, and its largest city."}',
}
REASONING_PREFIXES = {
    "no reasoning": "",
    "think block": "<think>\nNeed weather.\n</think>\n\n",
    "only </think>": "Need weather.\n</think>\n\n",
}
PARSERS = [
    ("hermes", None),
    ("hermes", "qwen3"),
    ("hermes", "deepseek_r1"),
    ("qwen3_coder", None),
    ("llama3_json", None),
    ("llama4_pythonic", None),
    ("mistral", None),
    ("granite", "granite"),
    ("granite4", None),
    ("phi4_mini_json", None),
    ("deepseek_v3", "deepseek_r1"),
    ("deepseek_v3", "deepseek_v3"),
    ("xlam", None),
    ("pythonic", None),
]
SIZES = [1, 2, 3, 5, 8, 0]  # 0: the whole output in one delta


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir, tmp_path_factory):
    from vllm.tokenizers import get_tokenizer

    root = tmp_path_factory.mktemp("matrix-tokenizers")
    src = Path(tiny_model_dir)

    def variant(name: str, **kw):
        return get_tokenizer(str(tokenizer_variant(src, root / name, markers=TINY_MARKERS, **kw)))

    return {
        "added tokens": variant("a", add=EXTRA_MARKERS, special=False),
        "special tokens": variant("s", add=EXTRA_MARKERS, special=True),
        "plain text": variant("t", drop=TINY_MARKERS, special=False),
    }


# What may follow the text so far: with the real rest, the whole-text results
# of these tell what no later text can change (tests/stream_driver.py).
CONTINUATIONS: list[str | tuple[str, ...]] = [
    "",
    "x",
    " ",
    "\n",
    '"',
    "}",
    "]",
    ")",
    ",",
    "0",
    "e5}",
    '\\u00e9"}',
    '"}}\n</tool_call>',
    "\n</tool_call>",
    "<tool_call>",
    "</think>",
    ("</think", ">"),
    ("<tool_call", ">"),
    # completions into a call, of each family: text before them is not content yet
    '{"name": "x", "arguments": {}}\n</tool_call>',
    '"x", "arguments": {}}',
    '[{"name": "x", "arguments": {}}]',
    "x()]",
    "(a=1)]",
    f"x\n```json\n{{}}\n```{DS_CALL_END}{DS_CALLS_END}",
]
# Closing syntax a stream may hold at the end of a call (`"}`, `\n```` + marker, `)]`).
CLOSING = 3
# Cells where the worker's unary result differs from vLLM's whole-text parse,
# (tool parser, format) → why. "*": every format of that parser.
DEPARTURES = {
    ("hermes", "hermes cut by Tokens"): "a call whose name went out stays a call when cut",
    ("granite4", "hermes cut by Tokens"): "a call whose name went out stays a call when cut",
    ("llama3_json", "*"): "text around calls is kept (vLLM drops every word once a call appears)",
    ("granite", "hermes list"): "content keeps its whitespace (vLLM's engine strips it with calls)",
    ("granite", "granite"): "content keeps its whitespace (vLLM's engine strips it with calls)",
}
# Parsers whose calls are not streamed (sent whole at the end), and why.
HELD: dict[str, str] = {}
WORST: dict[str, tuple[int, str]] = {}


def _setup(tokenizer, tool, reasoning, prompt_opens_think):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    cls = parser_class(tokenizer, tool, reasoning)
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER], "stream": True}
    )

    def new():
        return cls(tokenizer, req.tools, chat_template_kwargs={}, model_config=None)

    req = new().adjust_request(req)
    prompt = "<|im_start|>assistant\n" + ("<think>\n" if prompt_opens_think else "")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)

    def state():
        return OutputState(new, req, markers=added_markers(tokenizer), prompt_token_ids=prompt_ids)

    def unary(text, ids):
        return fields_of(state().parse_whole(text, ids))

    return new, req, state, unary


def _mismatch(streamed: Streamed, unary) -> str | None:
    reasoning, content, calls = streamed.reasoning, streamed.content, streamed.calls
    if reasoning != unary.reasoning:
        return f"reasoning {reasoning!r} != {unary.reasoning!r}"
    if content != unary.content:
        return f"content {content!r} != {unary.content!r}"
    got = [(c.name, c.arguments) for c in calls]
    want = [(c.name, c.arguments) for c in unary.tool_calls]
    if got != want:
        return f"calls {got!r} != {want!r}"
    if any(c.names_sent != 1 for c in calls):
        return "a call's name was sent more than once"
    for marker in LEAKS:
        if marker in reasoning + content and marker not in unary.reasoning + unary.content:
            return f"{marker!r} leaked"
    return None


def _vllm_departure(new, req, text, ids, unary) -> str | None:
    reasoning, content, calls = new().parse(
        text, req, enable_auto_tools=True, model_output_token_ids=ids
    )
    theirs = (reasoning or "", content or "", [(c.name, c.arguments) for c in calls or ()])
    ours = (unary.reasoning, unary.content, [(c.name, c.arguments) for c in unary.tool_calls])
    return None if theirs == ours else f"worker {ours!r} != vLLM {theirs!r}"


def _cells(tool, reasoning, prefixes=None, opened_both=True):
    names = REASONING_PREFIXES if reasoning else {"no reasoning": ""}
    for fmt, body in FORMATS.items():
        for prefix_name, prefix in names.items():
            if prefixes is not None and prefix_name not in prefixes:
                continue
            for opened in (False, True) if reasoning and opened_both else (False,):
                yield fmt, prefix_name, prefix + body, opened


def _tokenizer_or_skip(tokenizers, kind, tool, reasoning):
    tokenizer = tokenizers[kind]
    try:
        parser_class(tokenizer, tool, reasoning)
    except TypeError as e:
        # vLLM refuses this tokenizer (markers missing): LoadModel would too.
        assert "cannot be used with the tokenizer" in str(e)
        assert kind == "plain text"
        return None
    return tokenizer


@pytest.mark.parametrize("tokenizer_kind", ["added tokens", "special tokens", "plain text"])
@pytest.mark.parametrize(("tool", "reasoning"), PARSERS, ids=lambda p: str(p))
def test_streamed_equals_unary(tokenizers, tool, reasoning, tokenizer_kind):
    """Checks 1 and 2 of the module doc, every cell."""
    tokenizer = _tokenizer_or_skip(tokenizers, tokenizer_kind, tool, reasoning)
    if tokenizer is None:
        return
    failures, departures = [], []
    for fmt, prefix_name, text, opened in _cells(tool, reasoning):
        new, req, state, _ = _setup(tokenizer, tool, reasoning, opened)
        skip = req.skip_special_tokens
        ids = tokenizer.encode(text, add_special_tokens=False)
        decoded = tokenizer.decode(ids, skip_special_tokens=skip)
        unary = state().parse_whole(decoded, ids)
        cell = f"{fmt} / {prefix_name} / opened={opened}"
        problem = _vllm_departure(new, req, decoded, ids, unary)
        if problem and not (DEPARTURES.get((tool, fmt)) or DEPARTURES.get((tool, "*"))):
            departures.append(f"{cell}: {problem}")
        for size in SIZES:
            streamed = stream(state(), tokenizer, ids, size, skip_special_tokens=skip)
            problem = _mismatch(streamed, unary)
            if problem:
                failures.append(f"{cell} / {size}: {problem}")
    assert not failures, "\n".join(failures[:40]) + f"\n({len(failures)} failing)"
    assert not departures, "unlisted departures from vLLM:\n" + "\n".join(departures[:40])


def _held_back(tokenizers, tool, reasoning, kinds, prefixes, opened_both):
    """Check 3 of the module doc over the cells asked for; prints the worst."""
    late, worst = [], (0, "")
    for kind in kinds:
        tokenizer = _tokenizer_or_skip(tokenizers, kind, tool, reasoning)
        if tokenizer is None:
            continue
        for fmt, prefix_name, text, opened in _cells(tool, reasoning, prefixes, opened_both):
            _, req, state, unary_of = _setup(tokenizer, tool, reasoning, opened)
            skip = req.skip_special_tokens
            ids = tokenizer.encode(text, add_special_tokens=False)
            known_per_token = known_after_each_delta(
                unary_of, tokenizer, ids, 1, CONTINUATIONS, skip_special_tokens=skip
            )
            for size in (1, 3):
                streamed = stream(state(), tokenizer, ids, size, skip_special_tokens=skip)
                # what was determined after each delta of `size` tokens
                ends = range(size, len(ids) + size, size)
                known = [known_per_token[min(end, len(ids)) - 1] for end in ends]
                held = held_back(streamed.trace, known)
                cell = f"[{kind}] {fmt} / {prefix_name} / opened={opened} / {size}"
                worst = max(worst, (held, cell))
                bound = max(streamed.delta_bytes) + CLOSING
                if held > bound and tool not in HELD:
                    late.append(f"{cell}: {held} bytes held back (bound {bound})")
    print(f"\n{tool}+{reasoning}: worst held back {worst[0]} bytes ({worst[1]})")
    assert not late, "\n".join(late[:40]) + f"\n({len(late)} cells over the bound)"


@pytest.mark.parametrize(("tool", "reasoning"), PARSERS, ids=lambda p: str(p))
def test_held_back_bytes(tokenizers, tool, reasoning):
    """Check 3, on added-token markers, the think block closed in the output."""
    _held_back(
        tokenizers, tool, reasoning, ["added tokens"], ["no reasoning", "think block"], False
    )


@pytest.mark.long
@pytest.mark.parametrize(("tool", "reasoning"), PARSERS, ids=lambda p: str(p))
def test_held_back_bytes_every_cell(tokenizers, tool, reasoning):
    """Check 3 on every cell: special-token markers, think opened in the prompt."""
    _held_back(tokenizers, tool, reasoning, ["added tokens", "special tokens"], None, True)
