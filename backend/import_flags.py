"""The tables `import-command` converts by: `vllm serve`'s own flags, the gateway's typed keys.

vLLM's engine arguments need no table (vLLM's parser knows them). What it
does not know is listed here: the `vllm serve` flags that are not engine
arguments, with how many values each takes and why it is dropped (or None:
mapped by the converter), flags of older vLLM releases, and which engine
fields LocalAI's model config has a typed key for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

# How many values a flag takes (argparse nargs 0, None, "?", "+").
SWITCH, VALUE, OPTIONAL, VALUES = "switch", "value", "optional", "values"

_HTTP = "vLLM's HTTP server; the gateway serves the API"
_AUTH = "the gateway authenticates clients"
_PROCESS = "vllm serve's own process layout; the gateway starts this worker"
_RESPONSE = "vLLM's OpenAI responses and request logging; the gateway builds the responses"
_IMPLIED = (
    "implied: the worker parses tool calls whenever it has a tool parser and hides "
    "tools for tool_choice none"
)
_FORMAT = "the worker detects the chat template's content format, as vllm serve's default does"
_LORA = (
    "not imported: vllm serve offers named adapters beside the base model, while the "
    "gateway's lora_adapters apply the first one to every request"
)
_REMOVED = "no longer a vLLM flag; requests are not logged unless --enable-log-requests"


def _flags(arity: str, reason: str | None, names: str) -> dict[str, tuple[str, str | None]]:
    return dict.fromkeys(names.split(), (arity, reason))


# `vllm serve` flags that are not engine arguments → (arity, why dropped);
# None: mapped by `import_command`. `--no-X` forms of switches are accepted too.
# tests/unit/test_import_command.py checks this table against vLLM's parser.
SERVER_FLAGS = {
    **_flags(VALUE, None, "--tool-call-parser --tool-parser-plugin --chat-template"),
    **_flags(VALUE, None, "--default-chat-template-kwargs --config"),
    **_flags(SWITCH, _IMPLIED, "--enable-auto-tool-choice --exclude-tools-when-tool-choice-none"),
    **_flags(VALUE, _FORMAT, "--chat-template-content-format"),
    **_flags(VALUES, _LORA, "--lora-modules"),
    **_flags(VALUES, _AUTH, "--api-key"),
    **_flags(
        VALUE,
        _HTTP,
        """--host --port --uds --root-path --middleware --uvicorn-log-level --allowed-origins
        --allowed-methods --allowed-headers --ssl-keyfile --ssl-certfile --ssl-ca-certs
        --ssl-cert-reqs --ssl-ciphers --disable-access-log-for-endpoints
        --sse-keep-alive-interval --h11-max-incomplete-event-size --h11-max-header-count""",
    ),
    **_flags(
        SWITCH,
        _HTTP,
        """--disable-uvicorn-access-log --allow-credentials --enable-ssl-refresh
        --enable-request-id-headers --disable-fastapi-docs --enable-offline-docs
        --enable-server-load-tracking --enable-tokenizer-info-endpoint""",
    ),
    **_flags(
        VALUE,
        _PROCESS,
        """--api-server-count -asc --grpc-port --data-parallel-supervisor-port
        --dp-supervisor-probe-interval-s --dp-supervisor-probe-timeout-s
        --dp-supervisor-probe-failure-threshold""",
    ),
    **_flags(SWITCH, _PROCESS, "--headless --grpc --enable-scale-out"),
    **_flags(
        VALUE,
        _RESPONSE,
        """--response-role --max-log-len --fingerprint-mode --fingerprint-value
        --tool-strict-level --tool-server --anthropic-disabled-thinking-effort --cohere-format""",
    ),
    **_flags(
        SWITCH,
        _RESPONSE,
        """--return-tokens-as-token-ids --enable-prompt-tokens-details --tokens-only
        --enable-per-request-metrics --enable-force-include-usage --log-error-stack
        --enable-log-outputs --enable-log-deltas --cohere-is-reasoning-model
        --trust-request-chat-template --trust-request-mm-kwargs --enable-flash-late-interaction""",
    ),
}
# Flags of older vLLM releases, still common in pasted commands.
LEGACY_FLAGS = {
    **_flags(SWITCH, _REMOVED, "--disable-log-requests"),
    **_flags(VALUE, None, "--swap-space"),
}


def _positive_int(v: Any) -> bool:
    return type(v) is int and 0 < v < 2**31  # the gateway's fields are int32


def _set_text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _mm_limits(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and bool(v)
        and all(k in ("image", "video", "audio") and _positive_int(n) for k, n in v.items())
    )


# Engine field → (LocalAI ModelConfig key, whether the gateway's field can hold the
# value). A value it cannot hold (zero, negative, false: proto3's "unset") goes to
# engine_args instead. `--tokenizer` is `parameters.tokenizer` in LocalAI.
TYPED = {
    "max_model_len": ("context_size", _positive_int),
    "gpu_memory_utilization": ("gpu_memory_utilization", lambda v: type(v) is float and 0 < v <= 1),
    "dtype": ("dtype", _set_text),
    "quantization": ("quantization", _set_text),
    "load_format": ("load_format", _set_text),
    "trust_remote_code": ("trust_remote_code", lambda v: v is True),
    "enforce_eager": ("enforce_eager", lambda v: v is True),
    "tensor_parallel_size": ("tensor_parallel_size", _positive_int),
    "disable_log_stats": ("disable_log_stats", lambda v: v is True),
    "limit_mm_per_prompt": ("limit_mm_per_prompt", _mm_limits),
}
BACKEND_OPTIONS = ("tool_parser", "reasoning_parser", "chat_template", "tool_parser_plugin")


def arity_of(action: argparse.Action) -> str:
    """An argparse action's arity, in the words of the tables above."""
    if action.nargs == 0:
        return SWITCH
    return {"?": OPTIONAL, "+": VALUES, "*": VALUES}.get(str(action.nargs), VALUE)
