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

This module is pure: the engine module turns the returned dict into
`SamplingParams` (and `structured_outputs` into `StructuredOutputsParams`).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from backend import peer_json
from backend.errors import InvalidArgument

# Mirrors OpenAI's documented range and vLLM's check.
_LOGIT_BIAS_LIMIT = 100.0
MAX_TOP_LOGPROBS = 20


class SamplingRequest(Protocol):
    """The PredictOptions fields this module reads (the generated class fits)."""

    Tokens: int
    Temperature: float
    TopP: float
    TopK: int
    MinP: float
    Penalty: float
    FrequencyPenalty: float
    PresencePenalty: float
    Seed: int
    StopPrompts: Any
    IgnoreEOS: bool
    LogitBias: str
    Logprobs: int
    TopLogprobs: int
    Grammar: str
    TypicalP: float


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")
    return float(value)


def sampling_kwargs(req: SamplingRequest) -> dict[str, Any]:
    """Validated `SamplingParams` keyword arguments (without output_kind)."""
    kw: dict[str, Any] = {}

    if req.Tokens < 0:
        raise InvalidArgument(f"Tokens (max new tokens) must be >= 0, got {req.Tokens}")
    kw["max_tokens"] = req.Tokens or None

    temperature = _finite("Temperature", req.Temperature)
    if temperature < 0:
        raise InvalidArgument(f"Temperature must be >= 0, got {temperature}")
    kw["temperature"] = temperature

    top_p = _finite("TopP", req.TopP)
    if top_p != 0:
        if not 0 < top_p <= 1:
            raise InvalidArgument(f"TopP must be in (0, 1], got {top_p}")
        kw["top_p"] = top_p

    if req.TopK < -1:
        raise InvalidArgument(f"TopK must be >= 1, or 0/-1 to disable, got {req.TopK}")
    if req.TopK > 0:
        kw["top_k"] = req.TopK

    min_p = _finite("MinP", req.MinP)
    if not 0 <= min_p <= 1:
        raise InvalidArgument(f"MinP must be in [0, 1], got {min_p}")
    if min_p:
        kw["min_p"] = min_p

    penalty = _finite("Penalty", req.Penalty)
    if penalty < 0:
        raise InvalidArgument(f"Penalty (repetition penalty) must be > 0, got {penalty}")
    if penalty:
        kw["repetition_penalty"] = penalty

    for field, key in (
        ("FrequencyPenalty", "frequency_penalty"),
        ("PresencePenalty", "presence_penalty"),
    ):
        value = _finite(field, getattr(req, field))
        if not -2 <= value <= 2:
            raise InvalidArgument(f"{field} must be in [-2, 2], got {value}")
        if value:
            kw[key] = value

    if req.Seed > 0:
        kw["seed"] = req.Seed

    stops = [s for s in req.StopPrompts if s]
    if stops:
        kw["stop"] = stops
    if req.IgnoreEOS:
        kw["ignore_eos"] = True

    if req.LogitBias.strip():
        kw["logit_bias"] = parse_logit_bias(req.LogitBias)

    if req.Logprobs < 0 or req.TopLogprobs < 0:
        raise InvalidArgument("Logprobs and TopLogprobs must be >= 0")
    if req.TopLogprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"TopLogprobs must be <= {MAX_TOP_LOGPROBS}, got {req.TopLogprobs}")
    if req.Logprobs > 0 or req.TopLogprobs > 0:
        kw["logprobs"] = req.TopLogprobs

    typical_p = _finite("TypicalP", req.TypicalP)
    if typical_p not in (0.0, 1.0):
        raise InvalidArgument(
            f"TypicalP={typical_p} is not supported: vLLM has no typical sampling "
            "(leave it unset, 0 or 1)"
        )

    if req.Grammar.strip():
        kw["structured_outputs"] = structured_output(req.Grammar)
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
