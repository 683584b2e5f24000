"""Streamed == unary: parser x output format x chunking, with vLLM's real parsers.

For every (tool, reasoning) parser pair the family table can choose (plus
xlam and pythonic, which gateways name explicitly), on outputs in every
common call format, with the markers as plain added tokens, as *special*
added tokens (skipped from the text when the parser asks for
skip_special_tokens) and as plain text, with the think block opened in the
prompt and not, cut into engine deltas of 1, 2, 3, 5, 8 tokens and whole:
the concatenated streamed reasoning, content and each call's name and
arguments equal the unary result, and no marker text leaks into streamed
content or reasoning. There is no list of exempt cells: vLLM's own streaming
path disagrees with its whole-text path on several of these formats, and the
worker's rule (`OutputState`) is what makes every cell equal.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import vllm  # noqa: F401  (explicit: the matrix runs vLLM's real parsers)

from backend.parsing import OutputState
from tests.stream_driver import Streamed, added_markers, parser_class, stream
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


def _run(tokenizer, tool, reasoning, text, size, prompt_opens_think):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    cls = parser_class(tokenizer, tool, reasoning)
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER], "stream": True}
    )

    def new():
        return cls(tokenizer, req.tools, chat_template_kwargs={}, model_config=None)

    parser = new()
    req = parser.adjust_request(req)
    skip = req.skip_special_tokens
    state = OutputState(parser, req, markers=added_markers(tokenizer), whole_parser=new())
    prompt = "<|im_start|>assistant\n" + ("<think>\n" if prompt_opens_think else "")
    state.prompt_token_ids = tokenizer.encode(prompt, add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    streamed = stream(state, tokenizer, ids, size, skip_special_tokens=skip)
    unary = OutputState(new(), req).parse_whole(
        tokenizer.decode(ids, skip_special_tokens=skip), ids
    )
    return streamed, unary


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


@pytest.mark.parametrize("tokenizer_kind", ["added tokens", "special tokens", "plain text"])
@pytest.mark.parametrize(("tool", "reasoning"), PARSERS, ids=lambda p: str(p))
def test_streamed_equals_unary(tokenizers, tool, reasoning, tokenizer_kind):
    tokenizer = tokenizers[tokenizer_kind]
    try:
        parser_class(tokenizer, tool, reasoning)
    except TypeError as e:
        # vLLM refuses this tokenizer (markers missing): LoadModel would too.
        assert "cannot be used with the tokenizer" in str(e)
        assert tokenizer_kind == "plain text"
        return
    failures = []
    prefixes = REASONING_PREFIXES if reasoning else {"no reasoning": ""}
    for fmt, body in FORMATS.items():
        for prefix_name, prefix in prefixes.items():
            for opened in (False, True) if reasoning else (False,):
                for size in SIZES:
                    streamed, unary = _run(tokenizer, tool, reasoning, prefix + body, size, opened)
                    problem = _mismatch(streamed, unary)
                    if problem:
                        failures.append(
                            f"{fmt} / {prefix_name} / opened={opened} / {size}: {problem}"
                        )
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} failing)"
