"""backend.model_imports: a multimodal model whose vLLM module cannot import
fails LoadModel naming the missing package, not "failed to be inspected"."""

from __future__ import annotations

import importlib.util

import pytest

from backend import model_imports
from backend.errors import FailedPrecondition

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed: Qwen2-VL imports")
def test_qwen2vl_here_names_torchvision_and_how_to_get_it():
    with pytest.raises(FailedPrecondition) as err:
        model_imports.check_importable(["Qwen2VLForConditionalGeneration"])
    message = err.value.message
    assert message.startswith(
        "Qwen2VLForConditionalGeneration cannot be loaded here: vLLM's module "
        "vllm.model_executor.models.qwen2_vl needs the Python package 'torchvision'"
    )
    assert "matching the installed torch 2.13.0+cpu" in message
    assert "PyTorch's CPU wheel index" in message


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed")
def test_the_missing_package_is_found_behind_transformers_lazy_import_error():
    """gemma4_mm fails with transformers' own ModuleNotFoundError("Could not
    import module 'Gemma4Processor'"), whose `name` is None."""
    with pytest.raises(FailedPrecondition, match="needs the Python package 'torchvision'"):
        model_imports.check_importable(["Gemma4ForConditionalGeneration"])


def test_models_that_import_pass_and_text_models_are_not_imported():
    model_imports.check_importable(["PaddleOCRVLForConditionalGeneration"])
    assert model_imports.multimodal_modules(["Qwen2ForCausalLM", "NoSuchArch"]) == []
    assert model_imports.multimodal_modules(["PaddleOCRVLForConditionalGeneration"]) == [
        ("PaddleOCRVLForConditionalGeneration", "vllm.model_executor.models.paddleocr_vl")
    ]


def test_a_missing_ordinary_package_is_named_with_pip():
    message = model_imports.missing_module_message("KananaV", "m", "timm.layers")
    assert "needs the Python package 'timm'" in message
    assert "pip install timm" in message
    assert "torch" not in message
