"""LoadModel of a model whose vLLM module cannot import: say which package is missing.

vLLM inspects a model class in a subprocess and, when its module fails to
import, logs the traceback and raises only "Model architectures [...] failed
to be inspected. Please check the logs" (`registry._try_inspect_model_cls`).
The cause is nearly always a missing optional package: in the CPU profile
without PyTorch's CPU index, torchvision (PyPI's build links CUDA torch and
cannot load next to torch+cpu, so install.sh removes it), without which 61 of
vLLM 0.32's 112 multimodal model modules do not import (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, LLaVA and its variants, InternVL, Gemma 3, Mistral 3 / Pixtral, ...).

So before the engine starts, the module of each multimodal architecture is
imported here, and a `ModuleNotFoundError` becomes a message naming the
package and how to get it. Only multimodal architectures: the front end
imports their class anyway (vLLM builds their input processor in this
process), so nothing new is imported; a text model's module is left to the
engine processes, as vLLM intends (a GPU module imported here could
initialise CUDA before the engine forks).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from backend.errors import FailedPrecondition

# Packages that must be built for the installed torch, and how to get one.
_TORCH_BUILT = {"torchvision", "torchaudio", "torchcodec"}
_TORCH_HINT = (
    "it must be a build matching the installed torch {torch}: install.sh installs one when "
    "PyTorch's CPU wheel index (or a mirror of it, PIP_EXTRA_INDEX_URL) is reachable; PyPI's "
    "{name} wheels are CUDA builds that cannot load next to torch+cpu. Without that index, "
    "build {name} from its source release for this torch (pip install --no-build-isolation "
    "<source directory>) into the worker's venv"
)


def multimodal_modules(architectures: Sequence[str]) -> list[tuple[str, str]]:
    """(architecture, vLLM module) for those of `architectures` vLLM serves as
    multimodal models from a module of its own."""
    from vllm.model_executor.models import registry

    known = getattr(registry, "_MULTIMODAL_MODELS", {})
    out = []
    for arch in architectures:
        entry = registry.ModelRegistry.models.get(arch)
        module = getattr(entry, "module_name", None)
        if arch in known and module:
            out.append((arch, module))
    return out


def check_importable(architectures: Sequence[str]) -> None:
    """FailedPrecondition naming the missing package (or the import error)
    when a multimodal architecture's vLLM module does not import."""
    for arch, module in multimodal_modules(architectures):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            message = missing_module_message(arch, module, _missing_name(e))
            raise FailedPrecondition(message) from None
        except Exception as e:  # e.g. a torchvision built for another torch
            raise FailedPrecondition(
                f"{arch} cannot be loaded here: vLLM's module {module} fails to import "
                f"({type(e).__name__}: {e}) (README: Vision-language models)"
            ) from None


def _missing_name(e: BaseException) -> str:
    """The missing package's name. transformers' lazy modules raise a
    ModuleNotFoundError of their own without one ("Could not import module
    'Gemma4Processor'"); the original is in the exception chain."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        name = getattr(cur, "name", None)
        if isinstance(cur, ModuleNotFoundError) and name:
            return str(name)
        cur = cur.__cause__ or cur.__context__
    return ""


def missing_module_message(arch: str, module: str, name: str) -> str:
    top = name.split(".")[0]
    text = (
        f"{arch} cannot be loaded here: vLLM's module {module} needs the Python package "
        f"'{top or name}', which is not installed"
    )
    if top in _TORCH_BUILT:
        text += "; " + _TORCH_HINT.format(torch=_torch_version(), name=top)
    elif top:
        text += f"; install it into the worker's venv (pip install {top})"
    return text + " (README: Vision-language models)"


def _torch_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:
        return "(unknown)"
