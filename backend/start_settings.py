"""Gateway settings that need the engine's surroundings, applied as the engine starts.

`backend/gateway_settings.py` decides what each llama.cpp-family field means;
two of them can only be finished here: RoPE, merged into the model's own
parameters as vLLM reads them, and Threads, a CPU binding the engine core reads
from the environment it inherits when vLLM spawns it.
"""

from __future__ import annotations

import logging
import os

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.engine.async_llm import AsyncLLM

from backend import gateway_settings
from backend.errors import InvalidArgument
from backend.load_options import LoadPlan

log = logging.getLogger(__name__)


def construct(args: AsyncEngineArgs, env: dict[str, str]) -> AsyncLLM:
    """AsyncLLM.from_engine_args with `env` set while it runs: the engine core,
    spawned during it, reads its thread binding from the environment it
    inherits. Restored after, so a later LoadModel without Threads gets vLLM's
    default binding again."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        return AsyncLLM.from_engine_args(args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def thread_binding_env(plan: LoadPlan) -> dict[str, str]:
    """Threads on CPU → VLLM_CPU_OMP_THREADS_BIND (backend/gateway_settings.py)."""
    if not plan.threads:
        return {}
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list

    kw = plan.engine_kwargs
    ranks = int(kw.get("tensor_parallel_size") or 1) * int(kw.get("pipeline_parallel_size") or 1)
    cpus = [(c.id, c.physical_core) for c in get_allowed_cpu_list()]
    reserved = os.environ.get(gateway_settings.RESERVED_ENV, "")
    bind, note = gateway_settings.thread_binding(
        plan.threads, cpus, ranks, int(reserved) if reserved.isdigit() else ranks
    )
    if note:
        # INFO: the gateway sends Threads (its default: the machine's cores) with
        # every load; a smaller binding is the expected outcome, nothing to fix.
        log.info("LoadModel: %s", note)
    if bind is None:
        return {}
    log.info("LoadModel: Threads=%d → %s=%s", plan.threads, gateway_settings.THREADS_ENV, bind)
    return {gateway_settings.THREADS_ENV: bind}


def apply_rope(plan: LoadPlan) -> None:
    """Merge the RoPE fields into the model's own rope_parameters (read as vLLM
    reads them) and add them to hf_overrides; gateway_settings.resolve_rope says
    why they are merged here rather than passed as they are."""
    from vllm.transformers_utils.config import get_config

    assert plan.rope is not None
    kw = plan.engine_kwargs
    overrides = kw.get("hf_overrides") or {}
    if not isinstance(overrides, dict):
        raise InvalidArgument("RoPE fields cannot be combined with a callable hf_overrides")
    flat = {k: v for k, v in overrides.items() if not isinstance(v, dict)}
    try:
        config = get_config(
            kw["model"],
            bool(kw.get("trust_remote_code")),
            revision=kw.get("revision"),
            hf_overrides_kw=flat or None,
        )
    except Exception as e:
        raise InvalidArgument(f"RoPE fields: cannot read the model's config: {e}") from None
    target, nest = config, None
    if getattr(config, "rope_parameters", None) is None:
        text = config.get_text_config()
        if getattr(text, "rope_parameters", None) is not None:
            target, nest = text, "text_config"
    own = overrides.get("rope_parameters") or getattr(target, "rope_parameters", None)
    max_position = int(getattr(target, "max_position_embeddings", 0) or 0)
    rope, notes = gateway_settings.resolve_rope(plan.rope, own, max_position)
    if notes:
        log.info("LoadModel: settings accepted and not used: %s", "; ".join(notes))
    merged = dict(overrides)
    if nest:
        merged[nest] = {**(merged.get(nest) or {}), **rope}
    else:
        merged.update(rope)
    kw["hf_overrides"] = merged
    log.info("LoadModel: RoPE fields → hf_overrides %s", rope)
