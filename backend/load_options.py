"""ModelOptions → vLLM engine arguments plus this backend's own settings.

Three layers, later wins: the typed ModelOptions fields, then `Options[]`,
then `EngineArgs` (a JSON object). Each layer is validated on its own so an
error names where the bad value came from.

`Options[]` entries are `key:value` (split at the first `:`). Keys may be
written with `_` or `-` and with or without a leading `--`, so users can paste
vLLM CLI flags: `--enable-prefix-caching`, `--max-num-seqs:8`,
`--max-num-seqs=8`. Keys this backend owns (`BACKEND_KEYS`) are taken first;
every other key must be a vLLM engine flag and is parsed by vLLM's own
argument parser (passed in as `FlagParser`), so values are coerced exactly as
`vllm serve` would coerce them.

This module imports no vLLM: the engine module provides the parser.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from backend import peer_json
from backend.errors import InvalidArgument
from backend.gateway_settings import Options as GatewayOptions
from backend.gateway_settings import RopeRequest, gateway_settings

log = logging.getLogger(__name__)

# Options keys that configure this backend rather than the engine.
BACKEND_KEYS = {
    "tool_parser": "vLLM tool-call parser name (e.g. hermes), or 'none'",
    "reasoning_parser": "vLLM reasoning parser name (e.g. qwen3), or 'none'",
    "chat_template": "a Jinja chat template, inline or a path to a file",
    "tool_parser_plugin": "path of a Python file registering extra tool parsers",
}


class FlagParser(Protocol):
    """vLLM's engine-argument parser, reduced to what we need."""

    field_names: frozenset[str]

    def option_for(self, key: str) -> str | None:
        """The CLI option string for a normalized key (`max_num_seqs` →
        `--max-num-seqs`, `no_enable_x` → `--no-enable-x`, `tp` → `-tp`), or None."""
        ...

    def parse(self, flags: Sequence[tuple[str, str | None]]) -> dict[str, Any]:
        """(`--flag-name`, value or None for a bare flag) → {engine field: value}.

        Raises InvalidArgument naming the flag on an unknown flag or bad value.
        """
        ...


class ModelOptionsLike(GatewayOptions, Protocol):
    Model: str
    ModelFile: str
    ModelPath: str
    ContextSize: int
    MaxModelLen: int
    Seed: int
    DType: str
    Quantization: str
    LoadFormat: str
    GPUMemoryUtilization: float
    TrustRemoteCode: bool
    EnforceEager: bool
    SwapSpace: int
    TensorParallelSize: int
    Tokenizer: str
    DisableLogStatus: bool
    Embeddings: bool
    Reranking: bool
    LimitImagePerPrompt: int
    LimitVideoPerPrompt: int
    LimitAudioPerPrompt: int
    Options: Sequence[str]
    EngineArgs: str
    Overrides: Sequence[str]
    DraftModel: str
    LoraAdapter: str
    LoraAdapters: Sequence[str]
    LoraScale: float
    LoraScales: Sequence[float]


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    path: str
    scale: float = 1.0


@dataclass
class BackendSettings:
    tool_parser: str | None = None
    reasoning_parser: str | None = None
    chat_template: str | None = None
    tool_parser_plugin: str | None = None
    lora_adapters: list[LoraAdapter] = field(default_factory=list)


@dataclass
class LoadPlan:
    """Everything LoadModel decided before starting the engine."""

    engine_kwargs: dict[str, Any]
    settings: BackendSettings
    # Said once in the log: fields we accept but cannot honour.
    warnings: list[str] = field(default_factory=list)
    # (tool, reasoning) parser decided before the engine start (LoadedModel.validate).
    parsers: tuple[str | None, str | None] | None = None
    # Gateway settings finished at engine start (backend/gateway_settings.py):
    # RoPE changes to merge into the model's own parameters, and the model
    # runner's CPU thread count (0: vLLM's own binding).
    rope: RopeRequest | None = None
    threads: int = 0

    @property
    def model(self) -> str:
        return str(self.engine_kwargs["model"])


def normalize_key(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def split_option(entry: str) -> tuple[str, str | None]:
    """One `Options[]` entry → (normalized key, value or None for a bare flag).

    `--flag=value` is split at `=` when the `=` comes before any `:` (a JSON
    value after `=` may itself contain `:`), and `key=value` when there is no
    `:` at all; otherwise at the first `:`.
    A bare entry is only allowed as a CLI flag (`--flag`).
    """
    text = entry.strip()
    if not text:
        raise InvalidArgument("Options has an empty entry")
    eq, colon = text.find("="), text.find(":")
    if eq > 0 and (colon < 0 or (text.startswith("-") and eq < colon)):
        key, value = text[:eq], text[eq + 1 :]
    elif colon > 0:
        key, value = text[:colon], text[colon + 1 :]
    elif text.startswith("--"):
        return normalize_key(text), None
    else:
        raise InvalidArgument(
            f"Options entry {entry!r} has no value: write key:value (or --flag for a switch)"
        )
    key = normalize_key(key)
    if not key:
        raise InvalidArgument(f"Options entry {entry!r} has an empty key")
    return key, value.strip()


def closest(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' hint, or ''."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def resolve_model(opts: ModelOptionsLike) -> str:
    """The model reference vLLM should load.

    The gateway passes the user's model name in `Model` and, for file-based
    backends, `ModelFile` = ModelPath/Model. For vLLM, Model is usually a hub
    id or a directory; a local directory under the gateway's models path
    (ModelFile, or ModelPath/Model) wins when it exists, so a model the
    gateway downloaded is used instead of reaching for the hub.
    """
    candidates = []
    if opts.ModelFile:
        candidates.append(opts.ModelFile)
    if opts.ModelPath and opts.Model and not os.path.isabs(opts.Model):
        candidates.append(os.path.join(opts.ModelPath, opts.Model))
    for path in candidates:
        if os.path.isdir(path):
            return path
    if opts.Model:
        return opts.Model
    if opts.ModelFile:
        return opts.ModelFile
    raise InvalidArgument("ModelOptions.Model is empty: name a model (hub id or directory)")


def typed_fields(opts: ModelOptionsLike) -> tuple[dict[str, Any], list[str]]:
    """The typed ModelOptions fields that are set (non-zero) → engine kwargs."""
    kw: dict[str, Any] = {"model": resolve_model(opts)}
    warnings: list[str] = []
    if opts.MaxModelLen < 0 or opts.ContextSize < 0:
        raise InvalidArgument("ContextSize/MaxModelLen must be >= 0")
    if opts.MaxModelLen or opts.ContextSize:
        # MaxModelLen is the vLLM-specific field; it wins over the generic one.
        kw["max_model_len"] = opts.MaxModelLen or opts.ContextSize
    for src, dst in (
        ("DType", "dtype"),
        ("Quantization", "quantization"),
        ("LoadFormat", "load_format"),
        ("Tokenizer", "tokenizer"),
    ):
        value = getattr(opts, src).strip()
        if value:
            kw[dst] = value
    if opts.GPUMemoryUtilization:
        if not 0 < opts.GPUMemoryUtilization <= 1:
            raise InvalidArgument(
                f"GPUMemoryUtilization must be in (0, 1], got {opts.GPUMemoryUtilization}"
            )
        kw["gpu_memory_utilization"] = float(opts.GPUMemoryUtilization)
    if opts.TrustRemoteCode:
        kw["trust_remote_code"] = True
    if opts.EnforceEager:
        kw["enforce_eager"] = True
    if opts.TensorParallelSize < 0:
        raise InvalidArgument("TensorParallelSize must be >= 0")
    if opts.TensorParallelSize:
        kw["tensor_parallel_size"] = opts.TensorParallelSize
    if opts.Seed:
        kw["seed"] = opts.Seed
    if opts.DisableLogStatus:
        kw["disable_log_stats"] = True
    if opts.Embeddings or opts.Reranking:
        # Pooling runner: embeddings (a generative model is converted to an
        # embedding model), or scores for cross-encoder / reranker models.
        kw["runner"] = "pooling"
    limits = {
        "image": opts.LimitImagePerPrompt,
        "video": opts.LimitVideoPerPrompt,
        "audio": opts.LimitAudioPerPrompt,
    }
    if any(v < 0 for v in limits.values()):
        raise InvalidArgument("Limit{Image,Video,Audio}PerPrompt must be >= 0")
    limits = {k: v for k, v in limits.items() if v}
    if limits:
        kw["limit_mm_per_prompt"] = limits
    overrides = parse_overrides(opts.Overrides)
    if overrides:
        kw["hf_overrides"] = overrides
    if opts.DraftModel.strip():
        # The draft length is a load-time setting in vLLM (NDraft arrives per
        # request and cannot change it); override the whole config through
        # Options/EngineArgs `speculative_config` for anything else.
        kw["speculative_config"] = {
            "model": opts.DraftModel.strip(),
            "num_speculative_tokens": DEFAULT_DRAFT_TOKENS,
        }
    if opts.SwapSpace:
        warnings.append(
            f"SwapSpace={opts.SwapSpace} is ignored: this vLLM version has no CPU swap "
            "space (use Options cpu_offload_gb or kv offloading instead)"
        )
    return kw, warnings


DEFAULT_DRAFT_TOKENS = 3


def parse_overrides(entries: Sequence[str]) -> dict[str, Any]:
    """`Overrides[]` → vLLM `hf_overrides`: `key=value` entries (values JSON
    when they parse: numbers, booleans, objects) or whole JSON objects, merged
    in order."""
    out: dict[str, Any] = {}
    for entry in entries:
        text = entry.strip()
        if not text:
            continue
        if text.startswith("{"):
            data = peer_json.loads(text, "Overrides entry")
            if not isinstance(data, dict):
                raise InvalidArgument("Overrides JSON entries must be objects")
            out.update(data)
            continue
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise InvalidArgument(f"Overrides entry {entry!r} must be key=value or a JSON object")
        out[key.strip()] = peer_json.loads_or_text(value.strip())
    return out


def lora_adapters(opts: ModelOptionsLike) -> list[LoraAdapter]:
    """LoraAdapter / LoraAdapters with their scales (LoraScale / LoraScales;
    0 or missing = 1.0). Relative paths are resolved against ModelPath."""
    paths = [p for p in [opts.LoraAdapter, *opts.LoraAdapters] if p.strip()]
    scales = (
        [opts.LoraScale, *opts.LoraScales] if opts.LoraAdapter.strip() else list(opts.LoraScales)
    )
    out: list[LoraAdapter] = []
    seen: set[str] = set()
    for i, raw in enumerate(paths):
        path = raw.strip()
        if not os.path.isabs(path) and opts.ModelPath and not os.path.exists(path):
            path = os.path.join(opts.ModelPath, path)
        if path in seen:
            continue
        seen.add(path)
        scale = float(scales[i]) if i < len(scales) and scales[i] else 1.0
        if not math.isfinite(scale):
            raise InvalidArgument(f"LoRA scale for {raw!r} must be a finite number")
        name = os.path.basename(os.path.normpath(path)) or f"lora{i + 1}"
        if any(a.name == name for a in out):
            name = f"{name}-{i + 1}"
        out.append(LoraAdapter(name=name, path=path, scale=scale))
    return out


def lora_engine_kwargs(adapters: Sequence[LoraAdapter]) -> dict[str, Any]:
    """enable_lora with room for every adapter and the largest rank among them."""
    if not adapters:
        return {}
    ranks = []
    for adapter in adapters:
        config_path = os.path.join(adapter.path, "adapter_config.json")
        try:
            with open(config_path, encoding="utf-8") as f:
                ranks.append(int(json.load(f).get("r", 0)))
        except FileNotFoundError:
            raise InvalidArgument(
                f"LoRA adapter {adapter.path!r} has no adapter_config.json"
            ) from None
        except (OSError, ValueError, TypeError) as e:
            raise InvalidArgument(
                f"LoRA adapter {adapter.path!r}: bad adapter_config.json: {e}"
            ) from None
    kw: dict[str, Any] = {"enable_lora": True, "max_loras": len(adapters)}
    if max(ranks) > 0:
        kw["max_lora_rank"] = max(ranks)
    return kw


def options_layer(
    entries: Sequence[str], parser: FlagParser
) -> tuple[dict[str, Any], BackendSettings]:
    settings = BackendSettings()
    flags: list[tuple[str, str | None]] = []
    for entry in entries:
        key, value = split_option(entry)
        if key in BACKEND_KEYS:
            if not value:
                raise InvalidArgument(f"Options {key} needs a value: {BACKEND_KEYS[key]}")
            setattr(settings, key, value)
            continue
        option = parser.option_for(key)
        if option is None:
            raise InvalidArgument(
                f"Options entry {entry!r}: {key!r} is neither a vLLM engine argument nor "
                f"a backend option{closest(key, [*parser.field_names, *BACKEND_KEYS])}"
            )
        flags.append((option, value))
    return parser.parse(flags), settings


def engine_args_layer(raw: str, parser: FlagParser) -> dict[str, Any]:
    """The strict `EngineArgs` JSON object: every key must be an engine field.

    Values that have a CLI flag go through vLLM's parser like Options do, so
    a config object given as JSON (`structured_outputs_config`, ...) becomes
    the same typed object `vllm serve` would build; null sets the field to
    None (e.g. `max_model_len: null` keeps the model's own length).
    """
    field_names = parser.field_names
    if not raw.strip():
        return {}
    data = peer_json.loads(raw, "EngineArgs")
    if not isinstance(data, dict):
        raise InvalidArgument("EngineArgs must be a JSON object of vLLM engine arguments")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = normalize_key(str(key))
        if name not in field_names:
            raise InvalidArgument(
                f"EngineArgs key {key!r} is not a vLLM engine argument{closest(name, field_names)}"
            )
        option = parser.option_for(name)
        if value is None or option is None:
            out[name] = value
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = value
        else:
            text = json.dumps(value)
        out.update(parser.parse([(option, text)]))
    return out


@functools.cache
def platform_is_cpu() -> bool:
    """Whether vLLM runs on CPU here (imported late: this module imports no vLLM)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def build_load_plan(
    opts: ModelOptionsLike, parser: FlagParser, *, cpu: bool | None = None
) -> LoadPlan:
    kwargs, warnings = typed_fields(opts)
    gateway = gateway_settings(opts, parser, cpu=platform_is_cpu() if cpu is None else cpu)
    kwargs.update(gateway.engine_kwargs)
    if gateway.notes:
        # Said once per LoadModel; INFO, not WARNING: the same YAML serves every
        # backend, so these are expected and nothing needs doing.
        log.info("LoadModel: settings accepted and not used: %s", "; ".join(gateway.notes))
    adapters = lora_adapters(opts)
    kwargs.update(lora_engine_kwargs(adapters))
    from_options, settings = options_layer(list(opts.Options), parser)
    settings.lora_adapters = adapters
    kwargs.update(from_options)
    kwargs.update(engine_args_layer(opts.EngineArgs, parser))
    for key in ("tool_parser", "reasoning_parser"):
        value = getattr(settings, key)
        if value is not None and value.lower() == "none":
            setattr(settings, key, "")  # explicit "no parser": disables auto-choice
    if settings.reasoning_parser:
        # As `vllm serve --reasoning-parser` does: the engine then applies a
        # structured-output constraint only after the reasoning section.
        kwargs.setdefault("reasoning_parser", settings.reasoning_parser)
    return LoadPlan(
        engine_kwargs=kwargs,
        settings=settings,
        warnings=warnings,
        rope=gateway.rope,
        threads=gateway.threads,
    )


def describe(kwargs: Mapping[str, Any]) -> str:
    """Engine kwargs for the log, secrets masked."""
    shown = {k: ("***" if "token" in k else v) for k, v in sorted(kwargs.items())}
    return ", ".join(f"{k}={v!r}" for k, v in shown.items())
