"""PredictOptions → keyword arguments of vLLM's `SamplingParams`.

proto3 scalars carry no presence, so every field needs a decision about what
its zero means. The table below is that decision, one row per field:

| proto field        | SamplingParams     | zero / unset means                          |
|--------------------|--------------------|---------------------------------------------|
| Tokens             | max_tokens         | 0 → no cap: until EOS or the context limit  |
| Temperature        | temperature        | 0 → greedy (the gateway fills its default,  |
|                    |                    | so a 0 that reaches us was asked for)       |
| TopP               | top_p              | 0 → vLLM default (1.0)                      |
| TopK               | top_k              | 0 or -1 → disabled                          |
| MinP               | min_p              | 0 → disabled                                |
| Penalty            | repetition_penalty | 0 → vLLM default (1.0)                      |
| FrequencyPenalty   | frequency_penalty  | 0 → disabled                                |
| PresencePenalty    | presence_penalty   | 0 → disabled                                |
| Seed               | seed               | 0 or negative → random (use any other value |
|                    |                    | for reproducible sampling)                  |
| StopPrompts        | stop               | empty strings are dropped                   |
| IgnoreEOS          | ignore_eos         |                                             |
| LogitBias          | logit_bias         | JSON object {token id: bias in [-100,100]}  |
| Logprobs/TopLogprobs | logprobs         | either > 0 → logprobs=TopLogprobs           |
| Grammar            | structured_outputs | JSON → JSON schema, else a grammar          |
| TypicalP           | —                  | 0 or 1 → off; vLLM has no typical sampling, |
|                    |                    | any other value is rejected                 |

`Repeat`, `Batch`, `NKeep`, `Threads` and `NDraft` are llama.cpp settings with no
per-request meaning in vLLM (speculation is configured at load); the gateway
always sends them, so they are accepted and not used.

This module is pure and reads no protobuf: `backend/request.py` hands it the
field values. `finalize` makes the request's final keyword arguments (model
defaults, the chat parsers' adjustments, the context clamp), which the engine
module turns into `SamplingParams` — the two steps of vLLM's own
`get_max_tokens` + `to_sampling_params`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from backend import peer_json
from backend.errors import InvalidArgument

# Mirrors OpenAI's documented range and vLLM's check.
_LOGIT_BIAS_LIMIT = 100.0
MAX_TOP_LOGPROBS = 20


# Sampling fields whose unset value falls back to the model's
# generation_config.json, as `vllm serve` does. Temperature is not among
# them: a 0 that reaches us was asked for (see the table above).
GENERATION_DEFAULTS = (
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
)


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")
    return float(value)


def sampling_kwargs(
    *,
    tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    min_p: float,
    penalty: float,
    frequency_penalty: float,
    presence_penalty: float,
    seed: int,
    stop: Sequence[str],
    ignore_eos: bool,
    logit_bias: str,
    logprobs: int,
    top_logprobs: int,
    typical_p: float,
    grammar: str,
) -> dict[str, Any]:
    """Validated `SamplingParams` keyword arguments the caller set (the
    PredictOptions fields of the same names); errors name the proto field."""
    kw: dict[str, Any] = {}

    if tokens < 0:
        raise InvalidArgument(f"Tokens (max new tokens) must be >= 0, got {tokens}")
    kw["max_tokens"] = tokens or None

    temperature = _finite("Temperature", temperature)
    if temperature < 0:
        raise InvalidArgument(f"Temperature must be >= 0, got {temperature}")
    kw["temperature"] = temperature

    top_p = _finite("TopP", top_p)
    if top_p != 0:
        if not 0 < top_p <= 1:
            raise InvalidArgument(f"TopP must be in (0, 1], got {top_p}")
        kw["top_p"] = top_p

    if top_k < -1:
        raise InvalidArgument(f"TopK must be >= 1, or 0/-1 to disable, got {top_k}")
    if top_k > 0:
        kw["top_k"] = top_k

    min_p = _finite("MinP", min_p)
    if not 0 <= min_p <= 1:
        raise InvalidArgument(f"MinP must be in [0, 1], got {min_p}")
    if min_p:
        kw["min_p"] = min_p

    penalty = _finite("Penalty", penalty)
    if penalty < 0:
        raise InvalidArgument(f"Penalty (repetition penalty) must be > 0, got {penalty}")
    if penalty:
        kw["repetition_penalty"] = penalty

    for field, key, raw in (
        ("FrequencyPenalty", "frequency_penalty", frequency_penalty),
        ("PresencePenalty", "presence_penalty", presence_penalty),
    ):
        value = _finite(field, raw)
        if not -2 <= value <= 2:
            raise InvalidArgument(f"{field} must be in [-2, 2], got {value}")
        if value:
            kw[key] = value

    if seed > 0:
        kw["seed"] = seed

    stops = [s for s in stop if s]
    if stops:
        kw["stop"] = stops
    if ignore_eos:
        kw["ignore_eos"] = True

    if logit_bias.strip():
        kw["logit_bias"] = parse_logit_bias(logit_bias)

    if logprobs < 0 or top_logprobs < 0:
        raise InvalidArgument("Logprobs and TopLogprobs must be >= 0")
    if top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"TopLogprobs must be <= {MAX_TOP_LOGPROBS}, got {top_logprobs}")
    if logprobs > 0 or top_logprobs > 0:
        kw["logprobs"] = top_logprobs

    typical_p = _finite("TypicalP", typical_p)
    if typical_p not in (0.0, 1.0):
        raise InvalidArgument(
            f"TypicalP={typical_p} is not supported: vLLM has no typical sampling "
            "(leave it unset, 0 or 1)"
        )

    if grammar.strip():
        kw["structured_outputs"] = structured_output(grammar)
    return kw


def finalize(
    user: Mapping[str, Any],
    defaults: Mapping[str, Any],
    *,
    structured_outputs: Any,
    skip_special_tokens: bool | None,
    prompt_tokens: int,
    max_model_len: int,
) -> dict[str, Any]:
    """The request's SamplingParams keyword arguments, all layers applied.

    `user`: what the caller set (`sampling_kwargs` minus structured outputs);
    `defaults`: the model's generation_config.json values for the
    `GENERATION_DEFAULTS` the caller left unset; `structured_outputs` and
    `skip_special_tokens`: as the chat parsers left them (a tool_choice may
    replace the grammar with a structural tag; None: unset); then max_tokens
    is capped at what the context has left, as `vllm serve` does (vLLM itself
    would reject the request instead).
    """
    kw = {k: v for k, v in defaults.items() if k in GENERATION_DEFAULTS and user.get(k) is None}
    kw.update({k: v for k, v in user.items() if v is not None or k not in kw})
    if structured_outputs is not None:
        kw["structured_outputs"] = structured_outputs
    if skip_special_tokens is not None:
        kw["skip_special_tokens"] = skip_special_tokens
    if kw.get("max_tokens") is not None:
        kw["max_tokens"] = max(1, min(kw["max_tokens"], max_model_len - prompt_tokens))
    return kw


def parse_logit_bias(raw: str) -> dict[int, float]:
    data = peer_json.loads(raw, "LogitBias")
    if not isinstance(data, dict):
        raise InvalidArgument("LogitBias must be a JSON object {token id: bias}")
    out: dict[int, float] = {}
    for key, value in data.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise InvalidArgument(f"LogitBias key {key!r} is not a token id") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"LogitBias value for token {token} must be a number")
        if token < 0 or not -_LOGIT_BIAS_LIMIT <= value <= _LOGIT_BIAS_LIMIT:
            raise InvalidArgument(
                f"LogitBias entry {token}: {value} out of range (token id >= 0, "
                f"bias in [-{_LOGIT_BIAS_LIMIT:g}, {_LOGIT_BIAS_LIMIT:g}])"
            )
        out[token] = float(value)
    return out


def structured_output(grammar: str) -> dict[str, Any]:
    """`Grammar` → StructuredOutputsParams kwargs.

    Text that parses as a JSON object is a JSON schema (the gateway sends
    `response_format: json_schema` this way); anything else is handed to vLLM
    as a grammar (EBNF/GBNF/Lark, whatever its structured-output backend
    accepts), which vLLM validates when the request is added.
    """
    text = grammar.strip()
    if text.startswith(("{", "[")):
        schema = peer_json.loads(text, "Grammar (it looks like a JSON schema)")
        if not isinstance(schema, dict):
            raise InvalidArgument("Grammar JSON schema must be a JSON object")
        return {"json": schema}
    return {"grammar": grammar}
