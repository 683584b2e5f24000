"""Parser choice: the family table, and the tokenizer check before the engine starts."""

from __future__ import annotations

import logging

import pytest

from backend.errors import InvalidArgument
from backend.parser_choice import FAMILY_PARSERS, choose_parsers, family_parsers
from tests.tokenizer_variants import tokenizer_variant

CASES = [
    # (model name, model_type, architecture, tool, reasoning)
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "llama", "LlamaForCausalLM", None, None),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "llama", "LlamaForCausalLM", None, None),
    ("meta-llama/Llama-2-7b-chat-hf", "llama", "LlamaForCausalLM", None, None),
    ("/models/some-finetune", "llama", "LlamaForCausalLM", None, None),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama", "LlamaForCausalLM", "llama3_json", None),
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama", "LlamaForCausalLM", "llama3_json", None),
    ("meta-llama/Llama-3.2-3B-Instruct", "llama", "LlamaForCausalLM", "llama3_json", None),
    ("meta-llama/Llama-4-Scout-17B-16E-Instruct", "llama4", "x", "llama4_pythonic", None),
    ("NousResearch/Hermes-3-Llama-3.1-8B", "llama", "LlamaForCausalLM", "hermes", None),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2", "Qwen2ForCausalLM", "hermes", None),
    ("/models/qwen-finetune", "qwen2", "Qwen2ForCausalLM", "hermes", None),
    ("Qwen/QwQ-32B", "qwen2", "Qwen2ForCausalLM", "hermes", "deepseek_r1"),
    ("Qwen/Qwen3-8B", "qwen3", "Qwen3ForCausalLM", "hermes", "qwen3"),
    ("Qwen/Qwen3-30B-A3B-Instruct-2507", "qwen3_moe", "x", "hermes", None),
    ("Qwen/Qwen3-30B-A3B-Thinking-2507", "qwen3_moe", "x", "hermes", "qwen3"),
    ("Qwen/Qwen3-Coder-30B-A3B-Instruct", "qwen3_moe", "x", "qwen3_coder", None),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "qwen2", "x", "hermes", "deepseek_r1"),
    ("deepseek-ai/DeepSeek-R1", "deepseek_v3", "x", "deepseek_v3", "deepseek_r1"),
    ("deepseek-ai/DeepSeek-V3", "deepseek_v3", "x", "deepseek_v3", "deepseek_v3"),
    ("deepseek-ai/DeepSeek-V3.1", "deepseek_v3", "x", "deepseek_v31", "deepseek_v3"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral", "MistralForCausalLM", "mistral", None),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral", "x", "mistral", None),
    ("mistralai/Magistral-Small-2506", "mistral", "x", "mistral", "mistral"),
    ("ibm-granite/granite-3.3-8b-instruct", "granite", "x", "granite", "granite"),
    ("ibm-granite/granite-4.0-h-small", "granitemoehybrid", "x", "granite4", None),
    ("openai/gpt-oss-20b", "gpt_oss", "GptOssForCausalLM", "openai", "openai_gptoss"),
    ("HuggingFaceTB/SmolLM3-3B", "smollm3", "SmolLM3ForCausalLM", "hermes", "qwen3"),
    ("microsoft/Phi-4-mini-instruct", "phi3", "Phi3ForCausalLM", "phi4_mini_json", None),
    ("microsoft/Phi-3.5-mini-instruct", "phi3", "Phi3ForCausalLM", None, None),
    ("google/gemma-3-4b-it", "gemma3", "Gemma3ForConditionalGeneration", None, None),
    ("google/gemma-2-2b-it", "gemma2", "Gemma2ForCausalLM", None, None),
    ("/models/unknown", "bert", "BertModel", None, None),
]


@pytest.mark.parametrize(("name", "model_type", "arch", "tool", "reasoning"), CASES)
def test_family_table(name, model_type, arch, tool, reasoning):
    assert family_parsers(model_type, [arch], name)[:2] == (tool, reasoning)


def test_every_parser_of_the_table_is_registered_in_this_vllm():
    from backend.parser_choice import known_parsers

    known_tool, known_reasoning = known_parsers()
    for needle, tool, reasoning, why in FAMILY_PARSERS:
        assert tool is None or tool in known_tool, needle
        assert reasoning is None or reasoning in known_reasoning, needle
        assert why, needle


KNOWN = (["hermes", "llama3_json"], ["qwen3"])


def _choose(explicit_tool, explicit_reasoning, check, name="meta-llama/Llama-3.1-8B"):
    return choose_parsers(
        explicit_tool,
        explicit_reasoning,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        name=name,
        known_tool=KNOWN[0],
        known_reasoning=KNOWN[1],
        check=check,
    )


def test_an_automatic_choice_that_does_not_fit_is_skipped_with_a_warning(caplog):
    def check(kind, name):
        return "no <|python_tag|> token" if name == "llama3_json" else None

    with caplog.at_level(logging.WARNING, logger="backend.parser_choice"):
        assert _choose(None, None, check) == (None, None)
    assert "llama3_json" in caplog.text and "no <|python_tag|> token" in caplog.text
    assert _choose(None, None, lambda kind, name: None) == ("llama3_json", None)


def test_an_explicit_parser_that_does_not_fit_fails():
    def check(kind, name):
        return "missing <think>" if name == "qwen3" else None

    with pytest.raises(InvalidArgument, match="reasoning_parser 'qwen3' cannot be used: missing"):
        _choose(None, "qwen3", check)
    with pytest.raises(InvalidArgument, match="valid names"):
        _choose("nonesuch", None, None)
    # explicit "" (= none) disables the automatic choice, and is never checked
    assert _choose("", "", lambda kind, name: "never called") == (None, None)
    assert _choose("hermes", None, lambda kind, name: None) == ("hermes", None)


def test_an_automatic_choice_this_vllm_lacks_is_skipped(caplog):
    with caplog.at_level(logging.WARNING, logger="backend.parser_choice"):
        got = choose_parsers(
            None,
            None,
            model_type="qwen3",
            architectures=[],
            name="Qwen/Qwen3-8B",
            known_tool=["llama3_json"],
            known_reasoning=[],
        )
    assert got == (None, None)
    assert "no parser of that name" in caplog.text


# ---- the check itself, with vLLM's parsers and real tokenizers -------------


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir, tmp_path_factory):
    from vllm.tokenizers import get_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    markers = ("<think>", "</think>", "<tool_call>", "</tool_call>")
    return {
        "tiny": get_tokenizer(str(tiny_model_dir)),
        "bare": get_tokenizer(str(tokenizer_variant(tiny_model_dir, root / "bare", drop=markers))),
        "llama3": get_tokenizer(
            str(tokenizer_variant(tiny_model_dir, root / "l3", add=("<|python_tag|>",)))
        ),
    }


@pytest.mark.parametrize(
    ("tokenizer", "kind", "name", "fits"),
    [
        ("tiny", "tool", "hermes", True),
        ("tiny", "reasoning", "qwen3", True),
        ("tiny", "reasoning", "deepseek_r1", True),
        ("tiny", "tool", "llama3_json", False),
        ("llama3", "tool", "llama3_json", True),
        # vLLM's own check: these parse the markers as plain text too
        ("bare", "reasoning", "qwen3", True),
        ("bare", "tool", "hermes", True),
        ("bare", "tool", "deepseek_v3", False),
        ("tiny", "tool", "mistral", False),
    ],
)
def test_vllm_parsers_are_checked_against_the_tokenizer(tokenizers, tokenizer, kind, name, fits):
    from backend.parser_choice import parser_check

    problem = parser_check(tokenizers[tokenizer])(kind, name)
    assert (problem is None) == fits, problem
    if not fits:
        assert "tokenizer" in problem


def test_an_automatic_choice_needs_its_marker_tokens(tokenizers, caplog):
    from backend.parser_choice import known_parsers, parser_check

    known_tool, known_reasoning = known_parsers()

    def choose(tokenizer, explicit=None):
        return choose_parsers(
            explicit,
            None,
            model_type="qwen3",
            architectures=["Qwen3ForCausalLM"],
            name="/models/a-qwen3-finetune",
            known_tool=known_tool,
            known_reasoning=known_reasoning,
            check=parser_check(tokenizer),
            vocab=tokenizer.get_vocab(),
        )

    assert choose(tokenizers["tiny"]) == ("hermes", "qwen3")
    with caplog.at_level(logging.WARNING, logger="backend.parser_choice"):
        assert choose(tokenizers["bare"]) == (None, None)
    assert "no <tool_call> / </tool_call> token" in caplog.text
    assert "no <think> / </think> token" in caplog.text
    # Named explicitly, vLLM's rule applies: plain-text markers are fine.
    assert choose(tokenizers["bare"], explicit="hermes") == ("hermes", None)


def test_smollm2_like_model_loads_without_llama3_json(tokenizers, caplog):
    """The issue's case: a Llama-architecture model whose name says Llama 3 but
    whose tokenizer lacks <|python_tag|> gets no tool parser, and a warning."""
    from backend.parser_choice import known_parsers, parser_check

    known_tool, known_reasoning = known_parsers()
    with caplog.at_level(logging.WARNING, logger="backend.parser_choice"):
        got = choose_parsers(
            None,
            None,
            model_type="llama",
            architectures=["LlamaForCausalLM"],
            name="someone/llama-3-style-finetune",
            known_tool=known_tool,
            known_reasoning=known_reasoning,
            check=parser_check(tokenizers["tiny"]),
        )
    assert got == (None, None)
    assert "python_tag" in caplog.text
