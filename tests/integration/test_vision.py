"""Images through a real vision-language model: tiny PaddleOCR-VL (random
weights, its real processor) on the real engine over gRPC.

One worker and one engine start (~30 s here) serve the whole module. Both
request paths are driven: chat (UseTokenizerTemplate + Messages + Images, the
template places the placeholder) and raw (Prompt carrying the placeholder +
Images). With random weights and greedy decoding the answer is meaningless but
a deterministic function of every pixel, so "the image reaches the model" is
checked exactly: on the first token's log-probabilities.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image

from backend.gen import backend_pb2 as pb
from tests.conftest import Worker, retire, tiny_load_options
from tests.media_samples import (
    b64,
    garbage_idat_png,
    half_transparent,
    picture,
    png_with,
    truncated_jpeg,
)

QUESTION = "What is in the picture?"
PLACEHOLDER = "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"


def raw_prompt(images: int = 1) -> str:
    """The chat template's rendering of [images..., QUESTION]: a raw request
    with this prompt is token for token the chat request."""
    return f"<|begin_of_sentence|>User: {PLACEHOLDER * images}{QUESTION}\nAssistant: "


RAW_PROMPT = raw_prompt()
IMAGE_LIMIT = 2


class Vlm:
    def __init__(self, worker: Worker, model_dir: Path) -> None:
        self.worker = worker
        self.stub = worker.stub
        self.model_dir = model_dir

    def log_since(self, offset: int) -> str:
        self.worker.log_tail(1)  # flushes
        with open(self.worker.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_size(self) -> int:
        self.worker.log_tail(1)
        return self.worker.log_path.stat().st_size


@pytest.fixture(scope="module")
def vlm() -> Iterator[Vlm]:
    from tools.tiny_vlm import build_tiny_vlm, default_vlm_dir

    model_dir = build_tiny_vlm(default_vlm_dir("paddleocr"), "paddleocr")
    worker = Worker(args=["--debug-requests"])
    try:
        options = tiny_load_options(model_dir, MaxModelLen=4096, LimitImagePerPrompt=IMAGE_LIMIT)
        result = worker.stub.LoadModel(options, timeout=600)
        assert result.success, f"{result.message}\n{worker.log_tail()}"
        yield Vlm(worker, model_dir)
    finally:
        retire(worker)


@pytest.fixture(scope="module")
def processor(vlm: Vlm) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(vlm.model_dir))


def request(path: str, images: list[str], **fields: Any) -> pb.PredictOptions:
    fields.setdefault("Tokens", 6)
    if path == "chat":
        return pb.PredictOptions(
            UseTokenizerTemplate=True,
            Messages=[pb.Message(role="user", content=QUESTION)],
            Images=images,
            Temperature=0,
            **fields,
        )
    fields.setdefault("Prompt", raw_prompt(len(images)))
    return pb.PredictOptions(Images=images, Temperature=0, **fields)


def first_token_logprobs(reply: pb.Reply) -> list[tuple[str, float]]:
    first = json.loads(reply.logprobs)["content"][0]
    return [(t["token"], t["logprob"]) for t in first["top_logprobs"]]


def answer(vlm: Vlm, path: str, images: list[str]) -> tuple[bytes, list[tuple[str, float]]]:
    reply = vlm.stub.Predict(request(path, images, Logprobs=1, TopLogprobs=5), timeout=120)
    return reply.message, first_token_logprobs(reply)


PATHS = ["chat", "raw"]


# ---- the model sees the image ----------------------------------------------


@pytest.mark.parametrize("size", [(224, 224), (448, 448), (896, 896), (1200, 400), (100, 700)])
@pytest.mark.parametrize("path", PATHS)
def test_prompt_tokens_equal_the_model_processors_count(vlm, processor, path, size):
    """The engine's prompt is the processor's: 224² → 64 image tokens, 448²
    → 256, 896² → 1024; 1200x400 is scaled down, 100x700 snapped to 28s."""
    image = picture(*size)
    text = RAW_PROMPT
    if path == "chat":
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == RAW_PROMPT
    expected = len(processor(text=[text], images=[image])["input_ids"][0])
    reply = vlm.stub.Predict(request(path, [b64(image)], Tokens=1), timeout=120)
    assert reply.prompt_tokens == expected
    if size == (224, 224):
        assert expected == len(processor.tokenizer(RAW_PROMPT)["input_ids"]) + 64 - 1


@pytest.mark.parametrize("path", PATHS)
def test_the_image_reaches_the_model(vlm, path):
    a, b = b64(picture(224, 224, seed=1)), b64(picture(224, 224, seed=2))
    text_a, logprobs_a = answer(vlm, path, [a])
    _, logprobs_b = answer(vlm, path, [b])
    again = answer(vlm, path, [a])
    assert logprobs_a != logprobs_b, "two different images gave the same first-token distribution"
    assert again == (text_a, logprobs_a), "the same image twice gave different answers"


def test_both_paths_give_the_same_answer_for_the_same_prompt_and_image(vlm):
    """Defect 4: a half-transparent image was flattened onto black on the raw
    path and onto white on the chat path. Now both give the white-composited
    picture (what `vllm serve` gives the model), to the logprob."""
    rgba = b64(half_transparent().resize((224, 224)))
    white = Image.new("RGB", (224, 224), (255, 255, 255))
    white.paste(half_transparent().resize((224, 224)), mask=half_transparent().resize((224, 224)))
    chat = answer(vlm, "chat", [rgba])
    raw = answer(vlm, "raw", [rgba])
    assert chat == raw
    assert raw == answer(vlm, "raw", [b64(white)])


@pytest.mark.parametrize("path", PATHS)
def test_a_stream_concatenates_to_the_unary_reply(vlm, path):
    images = [b64(picture(448, 448, seed=3)), b64(picture(224, 224, seed=4))]
    unary = vlm.stub.Predict(request(path, images, Tokens=12), timeout=120)
    chunks = list(vlm.stub.PredictStream(request(path, images, Tokens=12), timeout=120))
    assert b"".join(c.message for c in chunks) == unary.message
    assert chunks[-1].prompt_tokens == unary.prompt_tokens
    assert chunks[-1].tokens == unary.tokens == 12


# ---- limits -------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_more_images_than_the_limit_is_invalid_argument(vlm, path):
    images = [b64(picture(56, 56))] * (IMAGE_LIMIT + 1)
    err = call_error(vlm, "Predict", request(path, images))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"Images: 3 given, the model takes at most {IMAGE_LIMIT}" in err.details()
    assert "LimitImagePerPrompt" in err.details()


@pytest.mark.parametrize(("field", "modality"), [("Videos", "video"), ("Audios", "audio")])
def test_media_an_image_model_does_not_take_is_invalid_argument(vlm, field, modality):
    req = request("chat", [])
    getattr(req, field).append(base64.b64encode(b"RIFF0000WAVEfmt ").decode())
    err = call_error(vlm, "Predict", req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{field}: the model takes no {modality} input" in err.details()


# ---- every bad image is the caller's error ---------------------------------------

BAD_IMAGES = {
    # Issue 27, defects 1 and 2: served black on the chat path, INTERNAL on the raw one.
    "garbage-idat-png": (garbage_idat_png(), "Images[1] (PNG 16x16) does not decode"),
    # Defects 2 and 5: INTERNAL on the raw path; the item was not named.
    "truncated-jpeg": (
        truncated_jpeg(),
        "Images[1] (JPEG 64x64) does not decode: OSError: image file is truncated",
    ),
    "not-base64": ("%%% not base64", "Images[1] is not valid base64"),
    "bomb": (png_with(9_000, 9_000, b"x"), "Images[1] is 9000x9000 (81000000 pixels): over"),
}


def call_error(vlm: Vlm, rpc: str, req: pb.PredictOptions) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        if rpc == "Predict":
            vlm.stub.Predict(req, timeout=120)
        else:
            list(vlm.stub.PredictStream(req, timeout=120))
    return err.value


def assert_refused_cleanly(vlm: Vlm, rpc: str, req: pb.PredictOptions, message: str) -> None:
    """INVALID_ARGUMENT with `message`, no traceback logged, and the worker
    still answers a good request."""
    start = vlm.log_size()
    err = call_error(vlm, rpc, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert message in err.details()
    assert "Traceback" not in vlm.log_since(start)
    assert vlm.stub.Predict(request("raw", [b64(picture(56, 56))], Tokens=1), timeout=120).tokens


@pytest.mark.parametrize("case", list(BAD_IMAGES))
@pytest.mark.parametrize("rpc", ["Predict", "PredictStream"])
@pytest.mark.parametrize("path", PATHS)
def test_a_bad_image_is_invalid_argument_naming_it(vlm, path, rpc, case):
    item, message = BAD_IMAGES[case]
    req = request(path, [b64(picture(56, 56)), item])
    assert_refused_cleanly(vlm, rpc, req, message)


@pytest.mark.parametrize("rpc", ["Predict", "PredictStream"])
def test_a_raw_prompt_without_the_placeholder_is_invalid_argument(vlm, rpc):
    """Defect 3: vLLM's AssertionError ("Failed to apply prompt replacement")
    ended INTERNAL with a traceback; it is the caller's mistake."""
    req = request("raw", [b64(picture(56, 56))], Prompt="Describe it.")
    assert_refused_cleanly(
        vlm,
        rpc,
        req,
        f"Images[0] has no place in Prompt: a raw Prompt must carry the model's "
        f"image placeholder {PLACEHOLDER!r} once per item",
    )


@pytest.mark.parametrize(("rpc", "seed"), [("Predict", 101), ("PredictStream", 102)])
def test_an_image_first_seen_in_a_refused_request_is_answered_next_time(vlm, rpc, seed):
    """Found by a shuffled run: vLLM's front end records an image in its
    processor cache while it processes a raw Prompt that is then refused (no
    placeholder), so the engine core never receives it. The next request with
    that image reached the core as a reference to it, vLLM ended the request with
    finish_reason "error" (retryable; its front end drops the entry), and the
    worker answered OK with 0 tokens. Now such an error fails the call
    UNAVAILABLE, and a request that produced nothing yet is sent again once.

    The image is one this worker has never seen, so the refused request is
    where it first meets it; the precondition (vLLM's cache-miss line) is
    checked in the log."""
    image = b64(picture(56, 56, seed=seed))
    start = vlm.log_size()
    refused = call_error(vlm, rpc, request("raw", [image], Prompt="Describe it."))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
    good = request("raw", [image], Tokens=2, IgnoreEOS=True)
    if rpc == "Predict":
        tokens = vlm.stub.Predict(good, timeout=120).tokens
    else:
        tokens = list(vlm.stub.PredictStream(good, timeout=120))[-1].tokens
    log = vlm.log_since(start)
    assert "Multi-modal cache miss" in log, "precondition: vLLM's cache drift did not happen"
    assert "preparing and sending it again once" in log
    assert tokens == 2
    assert "Traceback" not in log


@pytest.mark.parametrize("path", PATHS)
def test_an_image_the_processor_refuses_is_named_without_vllms_internals(vlm, path):
    """Defect 5: a 600x2 image (PaddleOCR-VL refuses aspect ratios over 200)
    came back with a PIL repr and the processor's kwargs in the message."""
    req = request(path, [b64(Image.new("RGB", (600, 2)))])
    start = vlm.log_size()
    err = call_error(vlm, "Predict", req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        "Images[0] (600x2): the model's processor (PaddleOCRVLProcessor) rejected it: "
        "ValueError: absolute aspect ratio must be smaller than 200, got 300.0"
    )
    assert "Traceback" not in vlm.log_since(start)


def test_image_sized_requests_in_sequence_on_one_connection_are_all_answered(vlm):
    """Found measuring image costs: 680 kB, 680 kB, 170 kB, then 2.7 MB on a
    fresh connection hung on the h2 transport: the window it still owed the
    peer (given back in 2 MiB batches) was counted as granted, so a message
    larger than what the peer had left never got a WINDOW_UPDATE. Each request
    is refused at once (not base64 images), so only the transport is exercised."""
    import grpc as grpc_

    from backend.gen import backend_pb2_grpc

    # A connection of its own (C-core shares connections between channels).
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc_.insecure_channel(vlm.worker.addr, options=options) as channel:
        stub = backend_pb2_grpc.BackendStub(channel)
        for size in (680_000, 680_000, 170_000, 2_720_000):
            with pytest.raises(grpc_.RpcError) as err:
                stub.Predict(pb.PredictOptions(Prompt="x", Images=["!" * size]), timeout=10)
            assert err.value.code() == grpc_.StatusCode.INVALID_ARGUMENT, size
