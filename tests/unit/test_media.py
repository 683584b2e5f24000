"""backend.media: every bad image is INVALID_ARGUMENT naming the item, and both
paths decode and flatten an image the same way (vLLM's / the processor's)."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
import zlib
from types import SimpleNamespace

import pytest
from PIL import Image

from backend import media
from backend.errors import InvalidArgument
from tests.media_samples import b64, garbage_idat_png, half_transparent, png_with, truncated_jpeg

LIMITS = {"image": 999}


def req(images=(), videos=(), audios=()):
    return SimpleNamespace(images=list(images), videos=list(videos), audios=list(audios))


def raw_path(images, limits=LIMITS):
    return asyncio.run(media.multi_modal_data(req(images), limits))["image"]


def chat_path(images, limits=LIMITS, text="what is this?"):
    messages = [{"role": "user", "content": text}]
    return asyncio.run(media.with_media(messages, req(images), limits))[0]["content"]


def both_paths(images):
    return {"raw": raw_path(images), "chat": media.images_in([{"content": chat_path(images)}])}


# ---- what a good image becomes -------------------------------------------


def test_chat_media_become_parts_of_the_last_user_message():
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "what is this?"},
    ]
    wav = base64.b64encode(b"RIFF....WAVEfmt ").decode()
    request = req([b64(Image.new("RGB", (4, 4), (255, 0, 0)))], audios=[wav])
    before = [dict(m) for m in messages]
    out = asyncio.run(media.with_media(messages, request, {"image": 1, "audio": 1}))
    assert messages == before, "the request's own messages are left as they are"
    parts = out[2]["content"]
    assert parts[0] == {"type": "text", "text": "what is this?"}
    assert parts[1]["type"] == "image_pil"
    assert parts[1]["image_pil"].size == (4, 4)
    assert parts[1]["image_pil"].getpixel((0, 0)) == (255, 0, 0)
    assert parts[2] == {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}
    assert out[0]["content"] == "first" and out[1] == messages[1]


def test_data_urls_are_accepted():
    (image,) = raw_path(["data:image/png;base64," + b64(Image.new("RGB", (3, 2)))])
    assert image.size == (3, 2)


def test_half_transparent_pixels_are_composited_onto_white_on_both_paths():
    """Defect 4: the raw path dropped alpha (`convert("RGB")`: the hidden
    colour, black here), the chat path composited onto white, so one image
    gave two outputs. Both now give what `vllm serve` gives the model for
    the same upload: vLLM composites onto white (`ImageMediaIO` for URLs,
    `_parse_image_data` for PIL images) before the model's processor sees
    it (transformers 5's own `convert_to_rgb` would drop alpha)."""
    from vllm.multimodal.media.image import ImageMediaIO

    upload = b64(half_transparent())
    expected = ImageMediaIO().load_bytes(base64.b64decode(upload)).media
    for path, (image,) in both_paths([upload]).items():
        assert image.mode == "RGB", path
        assert image.getpixel((3, 3)) == expected.getpixel((3, 3)) == (255, 127, 127), path
        assert image.getpixel((0, 0)) == (255, 255, 255), path
        assert image.tobytes() == expected.tobytes(), path


def test_a_palette_png_with_a_transparent_colour_is_composited_too():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    for path, (image,) in both_paths([b64(img, transparency=1)]).items():
        assert image.getpixel((1, 1)) == (255, 255, 255), path


def test_exif_orientation_is_applied_as_vllm_does():
    img = Image.new("RGB", (6, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    for path, (image,) in both_paths([b64(img, "JPEG", exif=exif)]).items():
        assert image.size == (2, 6), path


# ---- bad images: INVALID_ARGUMENT naming the item ----------------------------

BAD = {
    "not base64": ("!!not base64", r"Images\[1\] is not valid base64"),
    "empty": ("", r"Images\[1\] is empty"),
    "not an image": (
        base64.b64encode(b"hello, not an image").decode(),
        r"Images\[1\] is not an image in a format the worker accepts",
    ),
    "garbage IDAT (defect 1)": (garbage_idat_png(), r"Images\[1\] \(PNG 16x16\) does not decode"),
    "truncated JPEG (defects 2, 5)": (
        truncated_jpeg(),
        r"Images\[1\] \(JPEG 64x64\) does not decode: OSError: image file is truncated",
    ),
    "JPEG cut in its header": (
        truncated_jpeg(0.05),
        r"Images\[1\] is not an image in a format the worker accepts",
    ),
    # Pillow would hand an EPS to Ghostscript: vLLM's allowlist refuses it.
    "EPS": (
        base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n").decode(),
        r"Images\[1\] is not an image in a format",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("path", ["raw", "chat"])
def test_a_bad_image_is_invalid_argument_naming_it(case, path):
    item, message = BAD[case]
    images = [b64(Image.new("RGB", (4, 4))), item]
    with pytest.raises(InvalidArgument, match=message):
        raw_path(images) if path == "raw" else chat_path(images)


def test_a_huge_declared_size_is_refused_before_its_pixels_are_decoded():
    """A few bytes of PNG header can declare gigapixels: the budget is
    checked from the header, so nothing is allocated for them."""
    bomb = png_with(9_000, 9_000, zlib.compress(b"\0" * 1000))
    started = time.process_time()
    with pytest.raises(InvalidArgument, match=r"Images\[0\] is 9000x9000 .*budget"):
        raw_path([bomb])
    assert time.process_time() - started < 1.0


def test_the_pixel_budget_is_per_request(monkeypatch):
    monkeypatch.setattr(media, "MAX_REQUEST_PIXELS", 100)
    monkeypatch.setattr(media.PixelBudget.__init__, "__defaults__", (100,))
    small = b64(Image.new("RGB", (8, 8)))
    assert len(raw_path([small])) == 1
    with pytest.raises(InvalidArgument, match=r"Images\[1\] is 8x8 .*64 already taken"):
        raw_path([small, small])


# ---- counts and modalities, before anything is decoded ------------------------


def test_more_images_than_the_model_takes_is_refused_naming_the_limit():
    images = [b64(Image.new("RGB", (4, 4)))] * 3
    for run in (raw_path, chat_path):
        with pytest.raises(InvalidArgument, match=r"Images: 3 given, .* at most 2 .*LimitImage"):
            run(images, {"image": 2})


def test_a_modality_the_model_does_not_take_is_refused():
    with pytest.raises(InvalidArgument, match="Videos: the model takes no video input"):
        asyncio.run(media.with_media([{"role": "user"}], req(videos=["AAAA"]), LIMITS))
    with pytest.raises(InvalidArgument, match="takes no images"):
        raw_path([b64(Image.new("RGB", (4, 4)))], {})


def test_raw_prompts_take_images_only():
    with pytest.raises(InvalidArgument, match="UseTokenizerTemplate"):
        asyncio.run(media.multi_modal_data(req(audios=["AAAA"]), {"audio": 1}))


def test_media_without_a_user_message_is_an_error():
    with pytest.raises(InvalidArgument, match="no user message"):
        asyncio.run(
            media.with_media(
                [{"role": "system", "content": "s"}], req([b64(Image.new("RGB", (4, 4)))]), LIMITS
            )
        )


def test_images_are_decoded_off_the_event_loop(monkeypatch):
    """A 4000x3000 PNG takes ~0.3 s of CPU to decode: on the loop it would
    stall every other stream."""
    threads = []
    decode = media.decode_image

    def spy(*args, **kwargs):
        threads.append(threading.get_ident())
        return decode(*args, **kwargs)

    monkeypatch.setattr(media, "decode_image", spy)

    async def both() -> int:
        image = b64(Image.new("RGB", (4, 4)))
        await media.multi_modal_data(req([image]), LIMITS)
        await media.with_media([{"role": "user", "content": "x"}], req([image]), LIMITS)
        return threading.get_ident()

    loop_thread = asyncio.run(both())
    assert len(threads) == 2
    assert loop_thread not in threads


# ---- vLLM's errors for a caller's mistake ---------------------------------------


def test_a_prompt_without_the_placeholder_names_the_item_and_the_placeholder():
    exc = AssertionError("Failed to apply prompt replacement for mm_items['image'][1]")
    mapped = media.processor_error(exc, [], "<|image|>")
    assert mapped is not None
    assert mapped.message.startswith("Images[1] has no place in Prompt")
    assert "'<|image|>'" in mapped.message


def test_a_processor_refusal_names_the_item_without_vllms_repr():
    cause = ValueError("absolute aspect ratio must be smaller than 200, got 300.0")
    exc = ValueError(
        "Failed to apply PaddleOCRVLProcessor on data={'images': [<PIL.Image.Image image "
        "mode=RGB size=600x2 at 0x7F>]} with kwargs={'return_tensors': 'pt'}"
    )
    exc.__cause__ = cause
    one = media.processor_error(exc, [Image.new("RGB", (600, 2))], "")
    assert one is not None
    assert one.message == (
        "Images[0] (600x2): the model's processor (PaddleOCRVLProcessor) rejected it: "
        "ValueError: absolute aspect ratio must be smaller than 200, got 300.0"
    )
    two = media.processor_error(exc, [Image.new("RGB", (4, 4)), Image.new("RGB", (600, 2))], "")
    assert two is not None
    assert two.message.startswith("one of Images[0..1] (4x4, 600x2)")


def test_other_errors_are_left_alone():
    assert media.processor_error(ValueError("prompt too long"), [], "") is None
    assert media.processor_error(AssertionError("x"), [], "") is None
