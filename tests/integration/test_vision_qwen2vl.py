"""Qwen2-VL: the family most users mean by a VLM, and one that takes video.

vLLM's qwen2_vl module imports transformers' torchvision image processor, so
it loads only where torchvision matching torch is installed (install.sh gets
one from PyTorch's CPU wheel index; PyPI's wheel is a CUDA build that cannot
load next to torch+cpu). Here, without it, LoadModel must fail naming
torchvision; with it, the tiny Qwen2-VL must answer with images and video.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.gen import backend_pb2 as pb
from tests.conftest import Worker, retire, tiny_load_options
from tests.media_samples import b64, mp4, picture


def _torchvision_imports() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # a build for another torch: vLLM's import fails the same way
        return False
    return True


HAS_TORCHVISION = _torchvision_imports()
NEEDS_TORCHVISION = pytest.mark.skipif(
    not HAS_TORCHVISION,
    reason="torchvision matching torch is not installed (CPU profile without PyTorch's CPU "
    "index): vLLM's Qwen2-VL module cannot import; test_a_qwen2vl_load_here_fails_naming_"
    "torchvision covers this machine",
)


@pytest.fixture(scope="module")
def qwen2vl_dir() -> Path:
    from tools.tiny_vlm import build_tiny_vlm, default_vlm_dir

    return build_tiny_vlm(default_vlm_dir("qwen2vl"), "qwen2vl")


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed: Qwen2-VL loads")
def test_a_qwen2vl_load_here_fails_naming_torchvision(worker, qwen2vl_dir):
    """Was: "Model architectures ['Qwen2VLForConditionalGeneration'] failed to
    be inspected. Please check the logs" after vLLM's inspection subprocess.
    The check runs before the engine starts, so a loaded model keeps serving."""
    result = worker.stub.LoadModel(tiny_load_options(qwen2vl_dir), timeout=300)
    assert not result.success
    assert "Qwen2VLForConditionalGeneration cannot be loaded here" in result.message
    assert "needs the Python package 'torchvision'" in result.message
    assert "failed to be inspected" not in result.message


@pytest.fixture(scope="module")
def qwen2vl(qwen2vl_dir: Path) -> Iterator[Worker]:
    worker = Worker()
    try:
        result = worker.stub.LoadModel(
            tiny_load_options(qwen2vl_dir, MaxModelLen=4096), timeout=600
        )
        assert result.success, f"{result.message}\n{worker.log_tail()}"
        yield worker
    finally:
        retire(worker)


def chat(**fields) -> pb.PredictOptions:
    return pb.PredictOptions(
        UseTokenizerTemplate=True,
        Messages=[pb.Message(role="user", content="Describe it.")],
        Temperature=0,
        Tokens=4,
        **fields,
    )


@NEEDS_TORCHVISION
@pytest.mark.parametrize("size", [(224, 224), (448, 448), (300, 900)])
def test_qwen2vl_prompt_tokens_equal_its_processors_count(qwen2vl, qwen2vl_dir, size):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(qwen2vl_dir))
    image = picture(*size)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = len(processor(text=[text], images=[image])["input_ids"][0])
    reply = qwen2vl.stub.Predict(chat(Images=[b64(image)]), timeout=120)
    assert reply.prompt_tokens == expected


@NEEDS_TORCHVISION
def test_qwen2vl_takes_video_and_the_video_reaches_the_model(qwen2vl):
    text_only = qwen2vl.stub.Predict(chat(), timeout=120).prompt_tokens
    a = chat(Videos=[mp4(seed=1)], Logprobs=1, TopLogprobs=5)
    first = qwen2vl.stub.Predict(a, timeout=120)
    again = qwen2vl.stub.Predict(a, timeout=120)
    other = qwen2vl.stub.Predict(chat(Videos=[mp4(seed=2)], Logprobs=1, TopLogprobs=5), timeout=120)
    assert first.prompt_tokens > text_only + 10, "the video added (almost) no tokens"
    assert (first.message, first.logprobs) == (again.message, again.logprobs)
    assert first.logprobs != other.logprobs
    stream = list(qwen2vl.stub.PredictStream(a, timeout=120))
    assert b"".join(c.message for c in stream) == first.message
