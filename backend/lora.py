"""LoRA adapters: load-time preparation and per-request choice.

vLLM applies one adapter per request and has no per-request scale. The
gateway's LoraScale is honoured by loading a copy of the adapter whose
`lora_alpha` is multiplied by the scale (PEFT scales the update by
alpha / r, so this scales the adapter's effect exactly).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace

from backend.errors import InvalidArgument
from backend.load_options import LoraAdapter

METADATA_KEY = "lora_adapter"


def scaled_copies(adapters: Sequence[LoraAdapter]) -> tuple[list[LoraAdapter], str | None]:
    """Adapters ready to load, and the temp dir holding scaled copies (or None)."""
    if all(a.scale == 1.0 for a in adapters):
        return list(adapters), None
    workdir = tempfile.mkdtemp(prefix="lora-scaled-")
    out = []
    for adapter in adapters:
        if adapter.scale == 1.0:
            out.append(adapter)
            continue
        target = os.path.join(workdir, adapter.name)
        shutil.copytree(adapter.path, target)
        config_path = os.path.join(target, "adapter_config.json")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        config["lora_alpha"] = float(config.get("lora_alpha", config.get("r", 8))) * adapter.scale
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f)
        out.append(replace(adapter, path=target))
    return out, workdir


def choose(adapters: Sequence[LoraAdapter], wanted: str) -> int | None:
    """Index of the adapter a request uses: Metadata['lora_adapter'] (`wanted`)
    names one (or 'none'); by default the first loaded adapter applies to every
    request."""
    if not wanted:
        return 0 if adapters else None
    if wanted.lower() == "none":
        return None
    for i, adapter in enumerate(adapters):
        if adapter.name == wanted:
            return i
    names = ", ".join(a.name for a in adapters) or "none loaded"
    raise InvalidArgument(f"Metadata lora_adapter {wanted!r} is not a loaded adapter ({names})")
