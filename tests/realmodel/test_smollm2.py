"""SmolLM2-135M-Instruct through the worker, checked against transformers'
greedy generation on the same float32 directory (references computed here,
not stored), and against vLLM's own OpenAI server on the same model.

One worker and one engine for the whole module; transformers runs in the
test process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from backend.gen import backend_pb2 as pb
from tests.integration.chat_helpers import WEATHER_TOOL, collect

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EOS = 2  # <|im_end|>
TIMEOUT = 600

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
POEM = [{"role": "user", "content": "Write a haiku about the sea."}]
# Long enough that the answer runs past 400 tokens (checked below).
STORY = [
    {
        "role": "user",
        "content": "Write a long, detailed story about a young dragon who learns to bake "
        "bread in a small village. Describe every character and every step.",
    }
]
MULTI_TURN = [
    {"role": "user", "content": "Hi! My name is Alice and I live in Lyon."},
    {"role": "assistant", "content": "Nice to meet you, Alice! How can I help you today?"},
    {"role": "user", "content": "What is my name, and which city do I live in?"},
]
MULTILINGUAL = [{"role": "user", "content": "Copy this text exactly: Noël à Paris 🎄 北京 欢迎你!"}]
# The model repeats 🎉 (4 UTF-8 bytes, several tokens each) until max_tokens
# cuts one in the middle: the incomplete character must not be sent.
EMOJI_CUT = [
    {
        "role": "user",
        "content": "Repeat exactly, nothing else: « Crème brûlée à Noël », 你好, 世界, 🎉🚀",
    }
]
# name → (messages, max tokens, stops on EOS by itself)
PROMPTS = {
    "capital": (CAPITAL, 64, True),
    "poem": (POEM, 64, True),
    "story": (STORY, 420, False),
    "multi_turn": (MULTI_TURN, 64, True),
    "multilingual": (MULTILINGUAL, 64, True),
    "emoji_cut": (EMOJI_CUT, 64, False),
}
# The 420-token story costs ~2.5 min of transformers generation here: make test-all.
NAMES = [pytest.param(n, marks=pytest.mark.long) if n == "story" else n for n in sorted(PROMPTS)]


@dataclass
class Reference:
    prompt_ids: list[int]
    ids: list[int]  # generated ids, EOS included when generation stopped on it
    raw: str  # transformers' decoding: U+FFFD for a character cut at the end
    text: str  # what a client must get: no half character at the end


class References(dict):
    """name → Reference, computed on first use (so `-k` runs pay only for theirs)."""

    def __init__(self, hf) -> None:
        super().__init__()
        self.hf = hf

    def __missing__(self, name: str) -> Reference:
        messages, tokens, _ = PROMPTS[name]
        self[name] = ref = hf_greedy(self.hf, messages, tokens)
        return ref


def _messages(messages) -> list[pb.Message]:
    return [pb.Message(role=m["role"], content=m["content"]) for m in messages]


def chat(messages, tokens: int, **kw) -> pb.PredictOptions:
    kw.setdefault("Temperature", 0.0)
    return pb.PredictOptions(
        UseTokenizerTemplate=True, Messages=_messages(messages), Tokens=tokens, **kw
    )


def hf_greedy(hf, messages, max_new: int) -> Reference:
    import torch

    tok, model = hf
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=EOS,
            pad_token_id=EOS,
        )
    ids = out[0, len(prompt_ids) :].tolist()
    raw = tok.decode(ids, skip_special_tokens=True)
    # A cut inside a multi-byte character: those bytes are held back (vLLM's
    # detokenizer), not sent as U+FFFD.
    text = raw if ids[-1] == EOS else raw.rstrip("\ufffd")
    return Reference(prompt_ids, ids, raw, text)


@pytest.fixture(scope="module")
def references(hf_smollm2) -> References:
    return References(hf_smollm2)


def token_texts(tok, ids: list[int]) -> list[str]:
    """Each token's text as vLLM's logprobs report it: the text it adds (a
    token ending inside a multi-byte character reports "", and the one that
    completes the character everything held back), EOS as its special text."""
    out, before = [], ""
    for k, i in enumerate(ids):
        if i == EOS:
            out.append(tok.decode([i]))
            continue
        now = tok.decode(ids[: k + 1])
        if now.endswith("\ufffd"):  # a character still incomplete: held back whole
            out.append("")
            continue
        out.append(now[len(before) :])
        before = now
    return out


@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_transformers_token_for_token(smollm2, references, hf_smollm2, name):
    tok, _ = hf_smollm2
    messages, tokens, stops_on_eos = PROMPTS[name]
    ref = references[name]
    reply = smollm2.stub.Predict(chat(messages, tokens, Logprobs=1), timeout=TIMEOUT)
    got = collect([reply])
    assert got.content == ref.text
    assert reply.prompt_tokens == len(ref.prompt_ids)
    assert reply.tokens == len(ref.ids)
    # Token for token: the chosen token at every position, as vLLM reports it.
    entries = json.loads(reply.logprobs)["content"]
    assert [e["token"] for e in entries] == token_texts(tok, ref.ids)
    if stops_on_eos:
        # Stopped on EOS by itself, before max tokens (no IgnoreEOS).
        assert ref.ids[-1] == EOS and len(ref.ids) < tokens
    else:
        assert ref.ids[-1] != EOS and len(ref.ids) == tokens
    if name == "story":
        assert len(ref.ids) >= 400, "the long prompt must give a >= 400-token answer"


@pytest.mark.parametrize("name", NAMES)
def test_stream_equals_unary_and_every_chunk_is_whole_utf8(smollm2, references, name):
    messages, tokens, _ = PROMPTS[name]
    ref = references[name]
    chunks = list(smollm2.stub.PredictStream(chat(messages, tokens), timeout=TIMEOUT))
    streamed = collect(chunks)
    assert streamed.content == ref.text
    assert streamed.replies > 3, "streamed in pieces, not one reply"
    assert chunks[-1].tokens == len(ref.ids)
    assert chunks[-1].prompt_tokens == len(ref.prompt_ids)
    for chunk in chunks:
        for delta in chunk.chat_deltas:
            # A character cut between chunks would show up as U+FFFD.
            assert "\ufffd" not in delta.content, chunk
        assert "\ufffd" not in chunk.message.decode("utf-8")


def test_multilingual_answers_really_are_multilingual(references):
    """The UTF-8 cases above only mean something if the answers have
    multi-byte characters; checked here so a model change cannot hollow them."""
    text = references["multilingual"].text
    assert "à" in text and "北京" in text and "🎄" in text, text
    cut = references["emoji_cut"]
    assert cut.raw.endswith("\ufffd") and "🎉" in cut.text, "max_tokens cut inside 🎉"


def test_multi_turn_uses_the_history(references):
    assert "Alice" in references["multi_turn"].text


def test_ignore_eos_runs_to_max_tokens(smollm2, references):
    ref = references["capital"]
    reply = smollm2.stub.Predict(chat(CAPITAL, 40, IgnoreEOS=True), timeout=TIMEOUT)
    assert reply.tokens == 40 > len(ref.ids)


def test_stop_prompts_including_one_spanning_tokens(smollm2, references, hf_smollm2):
    tok, _ = hf_smollm2
    ref = references["poem"]
    pieces = token_texts(tok, ref.ids)
    # A stop string made of the end of one token and the start of the next,
    # at the first place where both sides have at least 2 characters.
    k = next(
        i
        for i in range(2, len(pieces) - 1)
        if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2
    )
    before = "".join(pieces[:k])
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    assert ref.text.index(stop) == len(before) + len(pieces[k]) - 2, "first occurrence"
    expected = ref.text[: ref.text.index(stop)]
    for request in (
        chat(POEM, 64, StopPrompts=[stop]),
        chat(POEM, 64, StopPrompts=["never in this text", stop]),
    ):
        unary = collect([smollm2.stub.Predict(request, timeout=TIMEOUT)])
        streamed = collect(smollm2.stub.PredictStream(request, timeout=TIMEOUT))
        assert unary.content == streamed.content == expected
        assert unary.tokens == k + 2, "stopped at the token that completed the stop string"
    # A stop string that does not occur changes nothing.
    whole = collect([smollm2.stub.Predict(chat(POEM, 64, StopPrompts=["zqzq"]), timeout=TIMEOUT)])
    assert whole.content == ref.text


def test_seeded_sampling_repeats(smollm2):
    def sample(seed: int) -> str:
        req = chat(STORY, 48, Temperature=1.0, TopP=1.0, Seed=seed)
        return collect([smollm2.stub.Predict(req, timeout=TIMEOUT)]).content

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first, "a different seed gives a different sample"


def test_tokenize_string_equals_hf_tokenizer(smollm2, hf_smollm2):
    tok, _ = hf_smollm2
    for text in (
        "Hello, world!",
        "  leading spaces and\ttabs\nnewlines",
        "Crème brûlée à Noël, 你好, 世界, 🎉🚀",
        "<|im_start|>user\nhi<|im_end|>",
    ):
        got = smollm2.stub.TokenizeString(pb.PredictOptions(Prompt=text), timeout=60)
        expected = tok(text, add_special_tokens=True)["input_ids"]
        assert list(got.tokens) == expected and got.length == len(expected), text


def test_logprobs_equal_transformers(smollm2, references, hf_smollm2):
    import torch

    tok, model = hf_smollm2
    ref = references["capital"]
    reply = smollm2.stub.Predict(chat(CAPITAL, 64, Logprobs=1, TopLogprobs=2), timeout=TIMEOUT)
    entries = json.loads(reply.logprobs)["content"]
    with torch.no_grad():
        logits = model(torch.tensor([ref.prompt_ids + ref.ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[len(ref.prompt_ids) - 1 : -1]
    assert len(entries) == len(ref.ids)
    for i, (entry, token) in enumerate(zip(entries, ref.ids, strict=True)):
        assert entry["logprob"] == pytest.approx(expected[i, token].item(), abs=2e-3), i
        second = expected[i].topk(2).indices[1].item()
        assert entry["top_logprobs"][1]["token"] == tok.decode([second])


def test_score_equals_transformers_and_prefers_the_right_answer(smollm2, hf_smollm2):
    import torch

    tok, model = hf_smollm2
    prompt = "The capital of France is"
    candidates = [" Paris", " London", " a city in France"]
    reply = smollm2.stub.Score(
        pb.ScoreRequest(prompt=prompt, candidates=candidates), timeout=TIMEOUT
    )
    prompt_ids = tok(prompt)["input_ids"]
    for candidate, got in zip(candidates, reply.candidates, strict=True):
        full = tok(prompt + candidate)["input_ids"]
        assert full[: len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
        expected = sum(lp[j - 1, full[j]].item() for j in range(len(prompt_ids), len(full)))
        assert got.num_tokens == len(full) - len(prompt_ids)
        assert got.log_prob == pytest.approx(expected, abs=5e-3), candidate
    assert reply.candidates[0].log_prob > reply.candidates[1].log_prob


NAMED = {"type": "function", "function": {"name": "get_weather"}}
WEATHER_Q = [{"role": "user", "content": "What's the weather like in Paris right now?"}]


def test_named_tool_choice_gives_a_parsed_tool_call(smollm2):
    req = chat(WEATHER_Q, 100, Tools=json.dumps([WEATHER_TOOL]), ToolChoice=json.dumps(NAMED))
    unary = collect([smollm2.stub.Predict(req, timeout=TIMEOUT)])
    streamed = collect(smollm2.stub.PredictStream(req, timeout=TIMEOUT))
    for result in (unary, streamed):
        assert result.content == ""
        assert [(c.name, json.loads(c.arguments)) for c in result.calls.values()] == [
            ("get_weather", {"city": "Paris"})
        ]
        assert all(c.id.startswith("chatcmpl-tool-") for c in result.calls.values())
    assert [c.name_deltas for c in streamed.calls.values()] == [1]


# ---- the same requests against vLLM's own OpenAI server --------------------------------


@pytest.fixture(scope="module")
def vllm_server(smollm2_dir):
    from tests.integration.test_differential import OpenAIServer

    server = OpenAIServer(smollm2_dir, parser_args=("--tool-call-parser", "pythonic"))
    yield server
    server.stop()


# Not the 420-token story: ~3 min of CPU here for what the transformers
# comparison above already pins token for token.
@pytest.mark.parametrize("name", ["capital", "multi_turn", "multilingual", "emoji_cut"])
def test_same_answer_as_vllm_serve(smollm2, vllm_server, references, name):
    messages, tokens, _ = PROMPTS[name]
    body = {"messages": messages, "temperature": 0, "max_tokens": tokens}
    theirs = vllm_server.unary(body)
    their_stream = vllm_server.streamed(body)
    ours = smollm2.stub.Predict(chat(messages, tokens), timeout=TIMEOUT)
    assert theirs.content == their_stream.content == collect([ours]).content
    assert theirs.content == references[name].text, "both equal transformers, too"
    assert (theirs.prompt_tokens, theirs.completion_tokens) == (ours.prompt_tokens, ours.tokens)
    assert (their_stream.prompt_tokens, their_stream.completion_tokens) == (
        ours.prompt_tokens,
        ours.tokens,
    )


@pytest.mark.parametrize("choice", ["named", "required"])
def test_same_tool_call_as_vllm_serve(smollm2, vllm_server, choice):
    tool_choice = NAMED if choice == "named" else "required"
    body = {
        "messages": WEATHER_Q,
        "temperature": 0,
        "max_tokens": 100,
        "tools": [WEATHER_TOOL],
        "tool_choice": tool_choice,
    }
    theirs = vllm_server.unary(body)
    req = chat(WEATHER_Q, 100, Tools=json.dumps([WEATHER_TOOL]), ToolChoice=json.dumps(tool_choice))
    ours = smollm2.stub.Predict(req, timeout=TIMEOUT)
    streamed = collect(smollm2.stub.PredictStream(req, timeout=TIMEOUT))
    assert (theirs.prompt_tokens, theirs.completion_tokens) == (ours.prompt_tokens, ours.tokens)
    if choice == "named":
        assert collect([ours]).structured() == theirs.structured
        assert streamed.structured() == theirs.structured
        assert theirs.structured["calls"] == [("get_weather", {"city": "Paris"})]
        return
    # "required" lets the model add calls; this one repeats get_weather until
    # max_tokens cuts the JSON list. vLLM's server then parses the list to
    # nothing; the worker streamed each call as its name came, so it keeps
    # them: the complete ones, and the last with the arguments generated
    # before the cut (as OpenAI returns a call cut by `length`).
    assert theirs.completion_tokens == 100 and theirs.structured["calls"] == []
    unary = collect([ours])
    calls = [(c.name, c.arguments) for _, c in sorted(unary.calls.items())]
    assert calls == [(c.name, c.arguments) for _, c in sorted(streamed.calls.items())]
    *whole, (last_name, last_args) = calls
    assert whole and all(c == ("get_weather", '{"city": "Paris"}') for c in whole), calls
    assert last_name == "get_weather" and '{"city": "Paris"}'.startswith(last_args)
