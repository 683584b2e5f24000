"""The llama.cpp-family settings the gateway sends every backend, and what each means to vLLM.

The gateway fills these ModelOptions fields from a model's YAML for every
backend (llama.cpp names). `FIELDS` is the one table of what the worker does
with each: mapped to its vLLM meaning, or accepted and ignored with the reason.
A llama.cpp-only setting is never an error (the same YAML serves several
backends); an ignored one that was set is said once at LoadModel. A setting
that maps but whose value vLLM cannot take fails LoadModel naming the field.

proto3 has no presence: 0 / "" / false mean "not set" for every field here
(llama.cpp's own meaningful zeros, such as YarnExtFactor 0, cannot arrive).

Three mappings need the engine's surroundings and finish as it starts (start_settings.py):
RoPE (merged into the model's own `rope_parameters`, `resolve_rope`), Threads
(CPUs chosen from the machine's topology, `thread_binding`), and the platform
(GPU-only and CPU-only meanings). This module imports no vLLM.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from backend.errors import InvalidArgument

MAPPED, IGNORED = "mapped", "ignored"

# field → (what the worker does, in one line). The README's table says the same.
FIELDS: dict[str, tuple[str, str]] = {
    "CacheTypeKey": (
        MAPPED,
        "kv_cache_dtype (vLLM has one type for keys and values; f16/bf16 are float16/bfloat16)",
    ),
    "CacheTypeValue": (MAPPED, "kv_cache_dtype, as CacheTypeKey (both set: they must agree)"),
    "RopeScaling": (
        MAPPED,
        "hf_overrides rope_parameters.rope_type: none → default, linear, yarn",
    ),
    "RopeFreqScale": (
        MAPPED,
        "rope_parameters.factor = 1/RopeFreqScale (linear, or the model's own yarn/linear)",
    ),
    "RopeFreqBase": (MAPPED, "rope_parameters.rope_theta"),
    "YarnAttnFactor": (
        MAPPED,
        "yarn attention_factor = YarnAttnFactor * (0.1*ln(factor) + 1), llama.cpp's mscale",
    ),
    "YarnBetaFast": (MAPPED, "yarn beta_fast"),
    "YarnBetaSlow": (MAPPED, "yarn beta_slow"),
    "YarnExtFactor": (
        IGNORED,
        "vLLM's YaRN always blends in extrapolation fully (llama.cpp's ext_factor 1.0)",
    ),
    "Threads": (
        MAPPED,
        "CPU: VLLM_CPU_OMP_THREADS_BIND, at most that many CPUs for the model runner(s), "
        "vLLM's reserved CPUs kept free; GPU: ignored (the GPU computes)",
    ),
    "MainGPU": (
        MAPPED,
        "GPU, one-device engine: device_ids [MainGPU]; otherwise ignored",
    ),
    "TensorSplit": (
        IGNORED,
        "vLLM splits tensors evenly over TensorParallelSize GPUs; uneven splits have no "
        "counterpart",
    ),
    "NGPULayers": (
        IGNORED,
        "vLLM runs every layer on its device; to keep weights in CPU memory use Options "
        "cpu_offload_gb",
    ),
    "LowVRAM": (
        IGNORED,
        "vLLM sizes GPU memory with GPUMemoryUtilization / Options kv_cache_memory_bytes",
    ),
    "MMap": (
        IGNORED,
        "vLLM reads safetensors memory-mapped already (Options safetensors_load_strategy "
        "for others)",
    ),
    "MLock": (IGNORED, "vLLM has no mlock: weights live in device memory or the runner's heap"),
    "NUMA": (
        IGNORED,
        "on CPU vLLM's thread binding follows NUMA nodes already; on GPU NUMA binding is "
        "Options numa_bind (needs numactl)",
    ),
    "FlashAttention": (
        IGNORED,
        "vLLM picks its attention backend per platform (FlashAttention where the GPU has "
        "it); Options attention_backend chooses another",
    ),
    "NoKVOffload": (
        IGNORED,
        "vLLM keeps the KV cache on the model's device; CPU offloading is Options "
        "kv_offloading_size",
    ),
}

# PredictOptions copies of load-time llama.cpp settings, accepted and not used:
# they cannot change a loaded vLLM engine per request.
PER_REQUEST_IGNORED = (
    "Threads",
    "MLock",
    "MMap",
    "MainGPU",
    "TensorSplit",
    "RopeFreqBase",
    "RopeFreqScale",
)

# llama.cpp spellings of vLLM cache types.
_CACHE_ALIASES = {"f16": "float16", "bf16": "bfloat16"}
ROPE_TYPES = {"none": "default", "linear": "linear", "yarn": "yarn"}
THREADS_ENV = "VLLM_CPU_OMP_THREADS_BIND"
RESERVED_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"


class Options(Protocol):
    """The ModelOptions fields read here."""

    CacheTypeKey: str
    CacheTypeValue: str
    RopeScaling: str
    RopeFreqScale: float
    RopeFreqBase: float
    YarnExtFactor: float
    YarnAttnFactor: float
    YarnBetaFast: float
    YarnBetaSlow: float
    Threads: int
    MainGPU: str
    TensorSplit: str
    NGPULayers: int
    LowVRAM: bool
    MMap: bool
    MLock: bool
    NUMA: bool
    FlashAttention: str
    NoKVOffload: bool
    TensorParallelSize: int


class KvCacheParser(Protocol):
    def parse(self, flags: Sequence[tuple[str, str | None]]) -> dict[str, Any]: ...


@dataclass
class RopeRequest:
    """RoPE changes asked for, to merge into the model's own parameters."""

    rope_type: str | None = None  # "default", "linear", "yarn"; None: keep the model's
    factor: float | None = None
    theta: float | None = None
    attn_factor: float | None = None  # llama.cpp's multiplier of YaRN's mscale
    beta_fast: float | None = None
    beta_slow: float | None = None


@dataclass
class GatewaySettings:
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    rope: RopeRequest | None = None
    threads: int = 0  # 0: leave vLLM's CPU thread binding alone
    notes: list[str] = field(default_factory=list)  # set but ignored, with the reason


def _positive(name: str, value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"{name} must be a positive number, got {value}")
    return float(value)


def _kv_cache_dtype(opts: Options, parser: KvCacheParser) -> str | None:
    values = {
        name: _CACHE_ALIASES.get(v.strip().lower(), v.strip().lower())
        for name in ("CacheTypeKey", "CacheTypeValue")
        if (v := getattr(opts, name)).strip()
    }
    if not values:
        return None
    if len(set(values.values())) > 1:
        raise InvalidArgument(
            "CacheTypeKey and CacheTypeValue differ "
            f"({opts.CacheTypeKey!r}, {opts.CacheTypeValue!r}): vLLM stores keys and values "
            "in one type (kv_cache_dtype); set both to the same value"
        )
    name, value = next(iter(values.items()))
    try:
        parsed = parser.parse([("--kv-cache-dtype", value)])
    except InvalidArgument as e:
        raise InvalidArgument(
            f"{name} {getattr(opts, name)!r} is not a KV cache type vLLM has ({e}; "
            "llama.cpp's f16/bf16 mean float16/bfloat16, its quantized q8_0/q4_0/... types "
            "have no vLLM counterpart)"
        ) from None
    return str(parsed.get("kv_cache_dtype", value))


def _rope(opts: Options, notes: list[str]) -> RopeRequest | None:
    scaling = opts.RopeScaling.strip().lower()
    if scaling and scaling not in ROPE_TYPES:
        raise InvalidArgument(
            f"RopeScaling {opts.RopeScaling!r} is not one the worker can apply: "
            f"{', '.join(ROPE_TYPES)} (others: Overrides rope_parameters)"
        )
    request = RopeRequest(rope_type=ROPE_TYPES.get(scaling))
    if opts.RopeFreqScale:
        request.factor = 1.0 / _positive("RopeFreqScale", opts.RopeFreqScale)
    if opts.RopeFreqBase:
        request.theta = _positive("RopeFreqBase", opts.RopeFreqBase)
    if request.rope_type in ("linear", "yarn") and request.factor is None:
        raise InvalidArgument(
            f"RopeScaling {scaling!r} needs RopeFreqScale (llama.cpp's rope_freq_scale: "
            "1/context extension, e.g. 0.25 for 4x)"
        )
    if opts.YarnAttnFactor:
        request.attn_factor = _positive("YarnAttnFactor", opts.YarnAttnFactor)
    if opts.YarnBetaFast:
        request.beta_fast = _positive("YarnBetaFast", opts.YarnBetaFast)
    if opts.YarnBetaSlow:
        request.beta_slow = _positive("YarnBetaSlow", opts.YarnBetaSlow)
    if opts.YarnExtFactor and opts.YarnExtFactor != 1.0:
        notes.append(f"YarnExtFactor={opts.YarnExtFactor:g}: {FIELDS['YarnExtFactor'][1]}")
    if request == RopeRequest():
        return None
    return request


_GPU_ID = re.compile(r"^(\d+|(GPU|MIG)-[0-9A-Za-z-]+)$")


def gateway_settings(opts: Options, parser: KvCacheParser, *, cpu: bool) -> GatewaySettings:
    """The gateway's llama.cpp-family fields → engine kwargs, pending RoPE and
    thread settings, and notes for the ones ignored. `cpu`: vLLM's platform is CPU."""
    out = GatewaySettings()
    notes = out.notes
    if (dtype := _kv_cache_dtype(opts, parser)) is not None:
        out.engine_kwargs["kv_cache_dtype"] = dtype
    out.rope = _rope(opts, notes)
    if opts.Threads < 0:
        raise InvalidArgument(f"Threads must be >= 0, got {opts.Threads}")
    if opts.Threads and not cpu:
        notes.append(
            f"Threads={opts.Threads}: on GPU the GPU computes; vLLM sizes its CPU threads itself"
        )
    elif opts.Threads and os.environ.get(THREADS_ENV):
        notes.append(
            f"Threads={opts.Threads}: {THREADS_ENV}={os.environ[THREADS_ENV]!r} is set in the "
            "worker's environment and wins"
        )
    elif opts.Threads:
        out.threads = opts.Threads
    main_gpu = opts.MainGPU.strip()
    if main_gpu:
        if not _GPU_ID.match(main_gpu):
            raise InvalidArgument(
                f"MainGPU {opts.MainGPU!r} must be a GPU index (0, 1, ...) or a GPU UUID"
            )
        if cpu:
            notes.append(f"MainGPU={main_gpu}: this vLLM runs on CPU")
        elif opts.TensorParallelSize > 1:
            notes.append(
                f"MainGPU={main_gpu}: an engine of {opts.TensorParallelSize} GPUs uses all of "
                "them (choose them with Options device_ids)"
            )
        else:
            out.engine_kwargs["device_ids"] = [int(main_gpu) if main_gpu.isdigit() else main_gpu]
    for name, value in (
        ("TensorSplit", opts.TensorSplit.strip()),
        ("NGPULayers", opts.NGPULayers),
        ("LowVRAM", opts.LowVRAM),
        ("MMap", opts.MMap),
        ("MLock", opts.MLock),
        ("NUMA", opts.NUMA),
        ("FlashAttention", opts.FlashAttention.strip()),
        ("NoKVOffload", opts.NoKVOffload),
    ):
        if value:
            notes.append(f"{name}={value}: {FIELDS[name][1]}")
    return out


# ---- finished at engine start, with the model's config ----------------------------

# Keys that belong to one scaling type: dropped when the type changes.
_SCALING_KEYS = {
    "type",
    "factor",
    "original_max_position_embeddings",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "low_freq_factor",
    "high_freq_factor",
    "short_factor",
    "long_factor",
    "truncate",
}


def _merge_rope(
    request: RopeRequest, own: Mapping[str, Any], max_position_embeddings: int
) -> tuple[dict[str, Any], int | None, list[str]]:
    """One (non-nested) rope_parameters dict → (merged dict, new
    max_position_embeddings or None, notes)."""
    own_type = str(own.get("rope_type") or own.get("type") or "default")
    rope_type = request.rope_type
    if rope_type is None:
        rope_type = (
            own_type if own_type in ("linear", "yarn") or request.factor is None else "linear"
        )
    merged = dict(own)
    if rope_type != own_type:
        merged = {k: v for k, v in merged.items() if k not in _SCALING_KEYS}
    merged["rope_type"] = rope_type
    if request.theta is not None:
        merged["rope_theta"] = request.theta
    notes: list[str] = []
    yarn_fields = {
        "YarnAttnFactor": request.attn_factor,
        "YarnBetaFast": request.beta_fast,
        "YarnBetaSlow": request.beta_slow,
    }
    if rope_type != "yarn":
        notes += [f"{k}={v:g}: only used with YaRN" for k, v in yarn_fields.items() if v]
    if rope_type == "default":
        return merged, None, notes
    if request.factor is not None:
        merged["factor"] = request.factor
    if "factor" not in merged:
        raise InvalidArgument(f"RoPE scaling {rope_type!r} needs RopeFreqScale")
    new_max = None
    if rope_type == "yarn":
        # vLLM (as transformers) takes a YaRN model's max_position_embeddings as
        # already extended: the pretraining length goes in the parameters.
        original = int(merged.get("original_max_position_embeddings") or max_position_embeddings)
        merged["original_max_position_embeddings"] = original
        new_max = int(original * float(merged["factor"]))
        if request.attn_factor is not None:
            factor = float(merged["factor"])
            mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
            merged["attention_factor"] = request.attn_factor * mscale
        if request.beta_fast is not None:
            merged["beta_fast"] = request.beta_fast
        if request.beta_slow is not None:
            merged["beta_slow"] = request.beta_slow
    return merged, new_max, notes


def resolve_rope(
    request: RopeRequest, own: Mapping[str, Any] | None, max_position_embeddings: int
) -> tuple[dict[str, Any], list[str]]:
    """The hf_overrides that apply `request` to a model whose (standardized)
    rope_parameters are `own`, and notes for requested settings that do not apply.

    vLLM applies a dict-valued hf_override after loading the config, replacing
    the attribute whole, so the model's own parameters are merged in here:
    rope_theta, partial_rotary_factor, ... survive. Per-layer-type parameters
    (sliding / full attention) get the same change each.
    """
    own = dict(own or {"rope_type": "default"})
    layer_types = {"full_attention", "sliding_attention", "chunked_attention"}
    notes: list[str] = []
    if own and set(own) <= layer_types:
        merged: dict[str, Any] = {}
        new_max = None
        for layer, params in own.items():
            if params is None:
                merged[layer] = None
                continue
            merged[layer], layer_max, layer_notes = _merge_rope(
                request, params, max_position_embeddings
            )
            new_max = layer_max or new_max
            notes = layer_notes
    else:
        merged, new_max, notes = _merge_rope(request, own, max_position_embeddings)
    overrides: dict[str, Any] = {"rope_parameters": merged}
    if new_max is not None:
        overrides["max_position_embeddings"] = new_max
    return overrides, notes


def thread_binding(
    threads: int, cpus: Sequence[tuple[int, int]], ranks: int, reserved: int
) -> tuple[str | None, str | None]:
    """VLLM_CPU_OMP_THREADS_BIND for `threads` model-runner threads in all, split
    over `ranks` model runners (tensor x pipeline parallel), from the CPUs this
    process may use, given as (cpu id, physical core id).

    One CPU per physical core first (SMT siblings share a core's units), and
    `reserved` CPUs left for vLLM's scheduler process and the worker, as vLLM's
    own automatic binding does (VLLM_CPU_NUM_OF_RESERVED_CPU, default one per
    model runner): bound to every CPU, the model runner's OpenMP threads fight
    them for the cores (measured on 2 CPUs: Threads 2 gave 4.7 tok/s median
    against 15.6 for Threads 1). So `threads` caps the CPUs used; asking for
    more than there are gives what vLLM would bind itself. Returns (value or
    None, a note when the request could not be met as asked)."""
    if not cpus:
        return None, f"Threads={threads}: no CPU list available, left to vLLM"
    seen: set[int] = set()
    first: list[int] = []
    siblings: list[int] = []
    for cpu, core in sorted(cpus):
        (siblings if core in seen else first).append(cpu)
        seen.add(core)
    order = first + siblings
    if len(order) < ranks:
        return None, f"Threads={threads}: {len(order)} CPUs for {ranks} model runners"
    usable = max(ranks, len(order) - max(0, reserved))
    per_rank = max(1, min(threads, usable) // ranks)
    note = None
    if per_rank * ranks != threads:
        note = (
            f"Threads={threads}: binding {per_rank * ranks} of the {len(order)} CPUs the worker "
            f"may use ({reserved} kept for vLLM's scheduler and the worker: "
            f"VLLM_CPU_NUM_OF_RESERVED_CPU) over {ranks} model runner(s)"
        )
    lists = [sorted(order[i * per_rank : (i + 1) * per_rank]) for i in range(ranks)]
    return "|".join(",".join(str(c) for c in cpu_list) for cpu_list in lists), note
