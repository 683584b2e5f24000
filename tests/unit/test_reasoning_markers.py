"""Reasoning markers never stream as reasoning, for every reasoning parser vLLM registers.

Each registered reasoning parser is built on the tiny model's tokenizer with its
markers as special added tokens, as added tokens that are not special, and as
plain text (where vLLM accepts that tokenizer); the output
`{start}Need weather.{end}Sure.` is streamed through `OutputState` in deltas of
1, 2 and 3 tokens. No streamed reasoning piece holds a marker, and the stream
equals the unary result. Parsers this machine cannot build (they need their
model's own tokenizer or metadata) are listed in `CANNOT_BUILD` with vLLM's
reason; a parser that newly fails to build fails the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import vllm  # noqa: F401  (explicit: vLLM's real parsers)

from backend.output.state import OutputState
from tests.stream_driver import added_markers, stream
from tests.tokenizer_variants import tokenizer_variant

# Markers of the registered parsers (added to the tokenizer so each can be built).
CANDIDATES = [
    "<think>",
    "</think>",
    "[THINK]",
    "[/THINK]",
    "<|START_THINKING|>",
    "<|END_THINKING|>",
    "<seed:think>",
    "</seed:think>",
    "<|channel>",
    "<channel|>",
    "<|content_thinking|>",
    "<|end_message|>",
    "<|plamo:begin_think:plamo|>",
    "<|plamo:end_think:plamo|>",
    "<|open|>",
    "<|close|>",
    "<|sep|>",
]
# What vLLM needs that the tiny model cannot give (name → the reason).
CANNOT_BUILD = {
    "cohere_command3": "needs the cohere-melody package (not a vLLM dependency)",
    "cohere_command4": "needs the cohere-melody package (not a vLLM dependency)",
    "hf": "needs the model's `response_template` metadata",
    "k2_horizon": "needs K2's think tokens for its reasoning effort",
    "minimax_m3": "needs MiniMax-M3's marker token ids",
    "mistral": "needs a Mistral tokenizer with [TOOL_CALLS]",
    "olmo3": "needs OLMo 3's tokenizer (its own BPE pieces)",
    "poolside_v1": "needs Poolside's <assistant> token",
}


def _registered() -> list[str]:
    from vllm.reasoning import ReasoningParserManager

    return sorted(ReasoningParserManager.list_registered())


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir, tmp_path_factory):
    from vllm.tokenizers import get_tokenizer

    root = tmp_path_factory.mktemp("reasoning-tokenizers")
    src = Path(tiny_model_dir)
    tiny = ["<think>", "</think>"]
    extra = CANDIDATES[2:]
    return {
        "special": get_tokenizer(
            str(tokenizer_variant(src, root / "s", markers=tiny, add=extra, special=True))
        ),
        "added": get_tokenizer(
            str(tokenizer_variant(src, root / "a", markers=tiny, add=extra, special=False))
        ),
        "plain": get_tokenizer(str(tokenizer_variant(src, root / "t", drop=tiny))),
    }


def _markers(parser) -> tuple[str, str] | None:
    rp = parser.reasoning_parser
    start, end = rp.reasoning_start_str, rp.reasoning_end_str
    return (start, end) if start and end else None


@pytest.mark.parametrize("name", _registered())
def test_no_reasoning_marker_streams_as_reasoning(tokenizers, name):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.parser import ParserManager

    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    checked = []
    for kind, tokenizer in tokenizers.items():
        try:
            cls = ParserManager.get_parser(
                tool_parser_name=None, reasoning_parser_name=name, tokenizer=tokenizer
            )
            parser = cls(tokenizer, None, chat_template_kwargs={}, model_config=None)
        except Exception as e:
            if kind == "plain":
                continue  # vLLM wants its markers as tokens: LoadModel refuses too
            assert name in CANNOT_BUILD, f"{name} cannot be built: {type(e).__name__}: {e}"
            pytest.skip(f"{name}: {CANNOT_BUILD[name]}")
        markers = _markers(parser)
        if markers is None:
            # No marker strings (granite's phrases, harmony channels, ...):
            # nothing marker-shaped is filtered, the stream == unary matrix
            # covers them where they are chosen.
            pytest.skip(f"{name} declares no reasoning_start_str/end_str")
        start, end = markers

        def new(cls=cls, tokenizer=tokenizer):
            return cls(tokenizer, None, chat_template_kwargs={}, model_config=None)

        text = f"{start}Need weather.{end}Sure."
        ids = tokenizer.encode(text, add_special_tokens=False)
        skip = new().adjust_request(req).skip_special_tokens
        prompt = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        unary = OutputState(new, req, prompt_token_ids=prompt).parse_whole(
            tokenizer.decode(ids, skip_special_tokens=skip), ids
        )
        for size in (1, 2, 3):
            state = OutputState(new, req, markers=added_markers(tokenizer), prompt_token_ids=prompt)
            pieces: list[str] = []
            original = state.feed

            def feed(*args, _original=original, _pieces=pieces, **kwargs):
                piece = _original(*args, **kwargs)
                _pieces.append(piece.reasoning)
                return piece

            state.feed = feed  # type: ignore[method-assign]
            streamed = stream(state, tokenizer, ids, size, skip_special_tokens=skip)
            leaked = [p for p in pieces if start in p or end in p]
            assert not leaked, f"{name} [{kind}] / {size}: markers streamed as reasoning: {leaked}"
            assert (streamed.reasoning, streamed.content) == (unary.reasoning, unary.content), (
                f"{name} [{kind}] / {size}"
            )
        checked.append(kind)
    assert checked, f"{name}: no tokenizer variant could be checked"
