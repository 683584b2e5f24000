"""Which of vLLM's tool and reasoning parsers a model gets, decided before the engine starts.

An explicit Options setting wins; failing that, the family table
(`FAMILY_PARSERS`) guesses from the model's name and config. Either choice is
then checked against the model's tokenizer (`missing_markers`, and vLLM's own
start-up check through `parser_check`), so a parser that cannot work fails the
LoadModel (explicit) or is dropped with a warning (guessed) while the model
being served is untouched.

The functions that ask vLLM (its parser registry, a `tool_parser_plugin`, the
model's config and tokenizer) import it when called: the choice itself is pure
and unit-tested on its own. What is done with the chosen parsers' output is in
`backend/output/state.py`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Container, Sequence
from typing import Any

from backend.errors import InvalidArgument
from backend.load_options import LoadPlan

log = logging.getLogger(__name__)


# Family table: (needle, tool parser, reasoning parser, why).
#
# The needle is looked for in the model name (path or hub id) first, then in
# config.json's `model_type` and `architectures`; the first row that matches
# wins, so specific rows come before generic ones. Every choice made here is
# then checked against the model's tokenizer before the engine starts
# (`choose_parsers`): a parser whose marker tokens the tokenizer lacks is
# skipped with a warning, so a wrong guess costs a feature, never the load.
#
# | family                       | tool            | reasoning     |
# |------------------------------|-----------------|---------------|
# | GPT-OSS                      | openai          | openai_gptoss |
# | Qwen3-Coder                  | qwen3_coder     | -             |
# | QwQ                          | hermes          | deepseek_r1   |
# | Qwen3 *-Instruct-2507        | hermes          | -             |
# | Qwen3 (original, *-Thinking-2507) | hermes     | qwen3         |
# | DeepSeek-R1-Distill-*        | hermes          | deepseek_r1   |
# | DeepSeek-R1                  | deepseek_v3     | deepseek_r1   |
# | DeepSeek-V3.1                | deepseek_v31    | deepseek_v3   |
# | DeepSeek-V3                  | deepseek_v3     | deepseek_v3   |
# | Qwen2 / Qwen2.5              | hermes          | -             |
# | Hermes (Nous)                | hermes          | -             |
# | Magistral                    | mistral         | mistral       |
# | Mistral / Mixtral            | mistral         | -             |
# | Llama 4                      | llama4_pythonic | -             |
# | Llama 3.x (by name)          | llama3_json     | -             |
# | other Llama architecture     | -               | -             |
# | Granite 4                    | granite4        | -             |
# | Granite 3                    | granite         | granite       |
# | Phi-4-mini                   | phi4_mini_json  | -             |
# | other Phi                    | -               | -             |
# | SmolLM3                      | hermes          | qwen3         |
# | SmolLM / SmolLM2             | -               | -             |
# | FunctionGemma                | functiongemma   | -             |
# | Gemma 4                      | gemma4          | gemma4        |
# | Gemma 1-3                    | -               | -             |
FAMILY_PARSERS: tuple[tuple[str, str | None, str | None, str], ...] = (
    ("gpt_oss", "openai", "openai_gptoss", "harmony format"),
    ("gpt-oss", "openai", "openai_gptoss", "harmony format"),
    ("qwen3_coder", "qwen3_coder", None, "XML calls <function=...>, no thinking"),
    ("qwen3-coder", "qwen3_coder", None, "XML calls <function=...>, no thinking"),
    # QwQ's template opens <think> in the prompt; deepseek_r1 expects that.
    ("qwq", "hermes", "deepseek_r1", "<tool_call> JSON; think block opened by the template"),
    # 2507 Instruct models do not think; 2507 Thinking ones open <think> in
    # the prompt, which the qwen3 parser handles (only </think> is generated).
    ("instruct-2507", "hermes", None, "<tool_call> JSON; 2507 Instruct has no thinking"),
    ("qwen3", "hermes", "qwen3", "<tool_call> JSON; <think> block"),
    ("deepseek-r1-distill", "hermes", "deepseek_r1", "base model's <tool_call>; R1 thinking"),
    ("deepseek-r1", "deepseek_v3", "deepseek_r1", "DeepSeek call markers; R1 thinking"),
    ("deepseek-v3.1", "deepseek_v31", "deepseek_v3", "V3.1 call format; thinking by template"),
    ("deepseek_v3", "deepseek_v3", "deepseek_v3", "DeepSeek call markers"),
    ("deepseek-v3", "deepseek_v3", "deepseek_v3", "DeepSeek call markers"),
    ("qwen2", "hermes", None, "<tool_call> JSON (Qwen2/2.5 template)"),
    ("hermes", "hermes", None, "<tool_call> JSON (Hermes 2/3 template)"),
    ("magistral", "mistral", "mistral", "[TOOL_CALLS]; [THINK] block"),
    ("mistral", "mistral", None, "[TOOL_CALLS]"),
    ("mixtral", "mistral", None, "[TOOL_CALLS]"),
    ("llama4", "llama4_pythonic", None, "pythonic calls (Llama 4 template)"),
    ("llama-4", "llama4_pythonic", None, "pythonic calls (Llama 4 template)"),
    ("llama-3", "llama3_json", None, "<|python_tag|>/JSON calls (Llama 3.1+ template)"),
    ("llama3", "llama3_json", None, "<|python_tag|>/JSON calls (Llama 3.1+ template)"),
    # The Llama architecture alone says nothing about the format: TinyLlama,
    # Llama 2, SmolLM2 and most fine-tunes have no tool-call tokens.
    ("llama", None, None, "Llama architecture without a known tool format"),
    ("granite-4", "granite4", None, "Granite 4 <tool_call> format"),
    ("granitemoehybrid", "granite4", None, "Granite 4 <tool_call> format"),
    ("granite", "granite", "granite", "<|tool_call|>; 'Here is my thought process'"),
    ("phi-4-mini", "phi4_mini_json", None, "functools[...] calls"),
    ("phi", None, None, "Phi templates define no tool format"),
    ("smollm3", "hermes", "qwen3", "<tool_call> JSON; <think> block"),
    ("smollm", None, None, "SmolLM/SmolLM2 templates define no tool format"),
    ("functiongemma", "functiongemma", None, "FunctionGemma call tokens"),
    ("gemma4", "gemma4", "gemma4", "Gemma 4 call and thinking tokens"),
    ("gemma-4", "gemma4", "gemma4", "Gemma 4 call and thinking tokens"),
    ("gemma", None, None, "Gemma 1-3 templates define no tool format"),
)


def family_parsers(
    model_type: str, architectures: Sequence[str], name: str
) -> tuple[str | None, str | None, str]:
    """(tool parser, reasoning parser, what matched) from the family table.

    The model name is searched first (it distinguishes e.g. DeepSeek-R1
    distills from their Qwen/Llama base), then model_type and architectures.
    """
    haystacks = [name.lower(), model_type.lower(), *(a.lower() for a in architectures)]
    for hay in haystacks:
        for needle, tool, reasoning, _why in FAMILY_PARSERS:
            if needle in hay:
                return tool, reasoning, needle
    return None, None, ""


# Tokens an automatically chosen parser needs in the vocabulary. vLLM's own
# check accepts e.g. hermes or qwen3 on any tokenizer (they also parse the
# markers as plain text); a guess is held to more: the model must have been
# trained with the markers as tokens, or the guess is probably wrong.
AUTO_MARKER_TOKENS: dict[str, tuple[str, ...]] = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "qwen3_coder": ("<tool_call>", "</tool_call>"),
    "llama3_json": ("<|python_tag|>",),
    "mistral": ("[TOOL_CALLS]",),
    "granite": ("<|tool_call|>",),
    "qwen3": ("<think>", "</think>"),
    "deepseek_r1": ("<think>", "</think>"),
    "mistral_reasoning": ("[THINK]", "[/THINK]"),
}


def missing_markers(name: str, kind: str, vocab: Container[str]) -> str | None:
    key = "mistral_reasoning" if (kind, name) == ("reasoning", "mistral") else name
    missing = [t for t in AUTO_MARKER_TOKENS.get(key, ()) if t not in vocab]
    if missing:
        return f"the tokenizer has no {' / '.join(missing)} token"
    return None


# (kind, parser name) → why it cannot work with this model's tokenizer, or None.
ParserCheck = Callable[[str, str], "str | None"]


def choose_parsers(
    explicit_tool: str | None,
    explicit_reasoning: str | None,
    *,
    model_type: str,
    architectures: Sequence[str],
    name: str,
    known_tool: Sequence[str],
    known_reasoning: Sequence[str],
    check: ParserCheck | None = None,
    vocab: Container[str] | None = None,
) -> tuple[str | None, str | None]:
    """Explicit setting wins ("" = explicitly none); else the family table.

    An unknown explicit name, or one `check` finds unusable with the model's
    tokenizer, is an error (LoadModel fails before the engine starts). An
    automatic choice this vLLM lacks or `check` rejects is skipped with a
    warning saying why: a guess never makes a load fail.
    """
    auto_tool, auto_reasoning, matched = family_parsers(model_type, architectures, name)
    chosen: list[str | None] = []
    for kind, explicit, auto, known in (
        ("tool", explicit_tool, auto_tool, known_tool),
        ("reasoning", explicit_reasoning, auto_reasoning, known_reasoning),
    ):
        if explicit is not None:
            if explicit and explicit not in known:
                raise InvalidArgument(
                    f"unknown {kind}_parser {explicit!r}; valid names: {', '.join(sorted(known))}"
                )
            problem = check(kind, explicit) if explicit and check is not None else None
            if problem:
                raise InvalidArgument(f"{kind}_parser {explicit!r} cannot be used: {problem}")
            chosen.append(explicit or None)
            log.info("%s parser: %s (from Options)", kind, explicit or "none")
            continue
        if not auto:
            chosen.append(None)
            log.info("%s parser: none (no family rule for this model)", kind)
            continue
        if auto not in known:
            problem = "this vLLM has no parser of that name"
        else:
            problem = missing_markers(auto, kind, vocab) if vocab is not None else None
            if problem is None and check is not None:
                problem = check(kind, auto)
        if problem:
            log.warning(
                "%s parser %s (family %r) skipped: %s; set %s_parser in Options to choose one",
                kind,
                auto,
                matched,
                problem,
                kind,
            )
            chosen.append(None)
        else:
            chosen.append(auto)
            log.info("%s parser: %s (chosen for model family %r)", kind, auto, matched)
    return chosen[0], chosen[1]


def known_parsers() -> tuple[list[str], list[str]]:
    """Registered (tool parser names, reasoning parser names) of this vLLM."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    return (
        sorted(ToolParserManager.list_registered()),
        sorted(ReasoningParserManager.list_registered()),
    )


def import_tool_parser_plugin(plugin: str) -> None:
    """Load a `tool_parser_plugin` the way `vllm serve --tool-parser-plugin`
    does (a .py file, or an importable module name), so the parsers it
    registers are known before parser names are checked."""
    from vllm.tool_parsers import ToolParserManager
    from vllm.utils.import_utils import import_plugin

    looks_like_path = plugin.endswith(".py") or os.sep in plugin
    if looks_like_path and not os.path.isfile(plugin):
        raise InvalidArgument(f"tool_parser_plugin {plugin!r}: no such file")
    before = set(ToolParserManager.list_registered())
    try:
        # Imports the file as a module named after it; None when that failed
        # (vLLM logs the traceback).
        module = import_plugin(plugin)
    except Exception as e:
        raise InvalidArgument(f"tool_parser_plugin {plugin!r} failed to import: {e!r}") from None
    if module is None:
        raise InvalidArgument(
            f"tool_parser_plugin {plugin!r} failed to import (the worker log has the traceback)"
        )
    added = sorted(set(ToolParserManager.list_registered()) - before)
    log.info("tool_parser_plugin %s registered: %s", plugin, ", ".join(added) or "nothing new")


def model_family(plan: LoadPlan) -> tuple[str, list[str], Any | None]:
    """(model_type, architectures, tokenizer), read without starting the engine.

    Cheap next to an engine start (config.json and the tokenizer files only);
    whatever cannot be read is returned empty/None with a warning, and the
    parser choice then works with less information.
    """
    from vllm.tokenizers import get_tokenizer
    from vllm.transformers_utils.config import get_config

    kw = plan.engine_kwargs
    trust = bool(kw.get("trust_remote_code"))
    model_type, architectures = "", []
    try:
        cfg = get_config(plan.model, trust_remote_code=trust, revision=kw.get("revision"))
        model_type = str(getattr(cfg, "model_type", "") or "")
        architectures = list(getattr(cfg, "architectures", None) or ())
    except Exception as e:
        log.warning("LoadModel: could not read the model config for parser choice: %s", e)
    tokenizer = None
    try:
        tokenizer = get_tokenizer(
            kw.get("tokenizer") or plan.model,
            tokenizer_mode=kw.get("tokenizer_mode", "auto"),
            trust_remote_code=trust,
            revision=kw.get("tokenizer_revision") or kw.get("revision"),
        )
    except Exception as e:
        log.warning("LoadModel: could not load the tokenizer to check parsers: %s", e)
    return model_type, architectures, tokenizer


def parser_check(tokenizer: Any) -> ParserCheck:
    """(kind, name) → why vLLM's parser cannot work with `tokenizer`, or None.

    Uses vLLM's own start-up check (`ParserManager.get_parser` builds the
    parser with the tokenizer: e.g. hermes needs `<tool_call>` tokens,
    llama3_json `<|python_tag|>`, qwen3 `<think>`).
    """
    from vllm.parser import ParserManager

    def check(kind: str, name: str) -> str | None:
        try:
            ParserManager.get_parser(
                tool_parser_name=name if kind == "tool" else None,
                reasoning_parser_name=name if kind == "reasoning" else None,
                enable_auto_tools=True,
                tokenizer=tokenizer,
            )
        except Exception as e:
            return f"its markers are not in this model's tokenizer ({e.__cause__ or e})"
        return None

    return check
