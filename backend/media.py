"""Base64 media of a request (PredictOptions' Images / Videos / Audios) → vLLM inputs.

Both paths decode an image once, here, the same way, and hand vLLM the
decoded picture: chat requests as `image_pil` content parts on the last user
message (so the chat template places the model's own placeholders), raw
prompts as `multi_modal_data` (the prompt must then carry the placeholders).

The decode is the one `vllm serve` applies to an uploaded image
(`ImageMediaIO.load_bytes`: vLLM's format allowlist, EXIF orientation,
transparency composited onto white, which vLLM also does to a PIL image
before the model's processor sees it) with two differences that make every
bad image the caller's error:

* all pixels are decoded (`load()`) before anything else touches the image.
  vLLM's loader first calls `ImageOps.exif_transpose` under a blanket
  `suppress(Exception)`; a failed decode there leaves Pillow's image marked
  loaded, so a PNG with intact chunk CRCs and garbage IDAT data was served
  as a black picture. (`Image.verify()`, used here before, decodes nothing.)
* a pixel budget per request, checked from each header before its pixels are
  decoded: a few KB of PNG can declare gigapixels.

Decoding a large image takes 0.1-0.3 s of CPU (4000x3000: JPEG 116 ms, PNG
305 ms here), which on the event loop would stall every other stream; the
whole request's media is decoded in one job on a small thread pool (Pillow
releases the GIL while it decodes).
"""

from __future__ import annotations

import asyncio
import binascii
import io
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pybase64

from backend.errors import InvalidArgument

if TYPE_CHECKING:
    from PIL.Image import Image

# Decoded pixels one request may bring, over all its images: a 48-megapixel
# photo, or five of 12 (~200 MiB as RGB while the request is prepared).
MAX_REQUEST_PIXELS = 64 * 2**20

# What transparent pixels become: white, vLLM's default
# (ImageMediaIO's rgba_background_color, _parse_image_data for PIL images).
BACKGROUND = (255, 255, 255)

# Concurrent decodes; the rest queue. Two cores here: more threads would
# only take CPU from the engine.
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="media-decode")

_AUDIO_MAGIC = (
    (b"RIFF", "wav"),
    (b"ID3", "mp3"),
    (b"\xff\xfb", "mp3"),
    (b"fLaC", "flac"),
    (b"OggS", "ogg"),
)

# PredictOptions field (named in errors) per vLLM modality name.
FIELDS = {"image": "Images", "video": "Videos", "audio": "Audios"}


class HasMedia(Protocol):
    """A request's media, base64 (backend/request.py's GenerationRequest)."""

    @property
    def images(self) -> Sequence[str]: ...

    @property
    def videos(self) -> Sequence[str]: ...

    @property
    def audios(self) -> Sequence[str]: ...


def _strip_data_url(text: str) -> str:
    """Accept a bare base64 string or a `data:...;base64,` URL."""
    text = text.strip()
    if text.startswith("data:") and "," in text:
        return text.split(",", 1)[1]
    return text


def decode(item: str, what: str) -> bytes:
    """Strict base64 → bytes. pybase64 (a vLLM dependency, what its loader
    uses): the standard library's validating decoder holds the GIL ~300 ms
    on a 27 MB image (it checks with a regex), pybase64 takes 14 ms."""
    try:
        raw = pybase64.b64decode(_strip_data_url(item), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{what} is not valid base64") from None
    if not raw:
        raise InvalidArgument(f"{what} is empty")
    return raw


class PixelBudget:
    """What is left of a request's MAX_REQUEST_PIXELS."""

    def __init__(self, total: int = MAX_REQUEST_PIXELS) -> None:
        self.total = total
        self.left = total

    def take(self, width: int, height: int, what: str) -> None:
        pixels = width * height
        if pixels > self.left:
            spent = self.total - self.left
            raise InvalidArgument(
                f"{what} is {width}x{height} ({pixels} pixels): over the request's budget of "
                f"{self.total} decoded pixels ({spent} already taken by earlier images)"
            )
        self.left -= pixels


def decode_image(raw: bytes, what: str, budget: PixelBudget) -> Image:
    """Encoded bytes → an RGB image, every pixel decoded; InvalidArgument naming `what`."""
    from PIL import Image as PILImage
    from vllm.multimodal.image import (
        ALLOWED_IMAGE_FORMATS,
        convert_image_mode,
        normalize_image,
    )

    try:
        image = PILImage.open(io.BytesIO(raw), formats=ALLOWED_IMAGE_FORMATS)
    except PILImage.UnidentifiedImageError:
        raise InvalidArgument(
            f"{what} is not an image in a format the worker accepts "
            f"({', '.join(ALLOWED_IMAGE_FORMATS)})"
        ) from None
    except Exception as e:  # a malformed header raises anything from struct to SyntaxError
        raise InvalidArgument(f"{what} is not a decodable image: {_reason(e)}") from None
    budget.take(image.width, image.height, what)
    try:
        image.load()
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, EOFError, ...
        raise InvalidArgument(
            f"{what} ({image.format} {image.width}x{image.height}) does not decode: {_reason(e)}"
        ) from None
    return convert_image_mode(normalize_image(image), "RGB", BACKGROUND)


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_counts(request: HasMedia, limits: Mapping[str, int]) -> None:
    """More items than the model takes is INVALID_ARGUMENT before any image's
    pixels are decoded.

    `limits`: items per prompt the loaded model accepts, per vLLM modality
    (its supported modalities capped by Limit*PerPrompt); a missing modality
    takes none.
    """
    for modality, field in FIELDS.items():
        given = len(getattr(request, field.lower()))
        limit = limits.get(modality, 0)
        if given and limit == 0:
            raise InvalidArgument(
                f"{field}: the model takes no {modality} input"
                if limits
                else f"{field}: this model takes no images/videos/audio (it is text-only)"
            )
        if given > limit:
            raise InvalidArgument(
                f"{field}: {given} given, the model takes at most {limit} per prompt "
                f"(LoadModel's Limit{modality.capitalize()}PerPrompt sets it)"
            )


def _decoded(request: HasMedia, limits: Mapping[str, int]) -> list[Image]:
    """A request's images, checked in this order: every item's base64 (cheap,
    bounded by the message size), the counts against `limits`, then each
    image's pixels within the request's budget."""
    images = [decode(item, f"Images[{i}]") for i, item in enumerate(request.images)]
    for field in ("Videos", "Audios"):
        for i, item in enumerate(getattr(request, field.lower())):
            decode(item, f"{field}[{i}]")
    check_counts(request, limits)
    budget = PixelBudget()
    return [decode_image(raw, f"Images[{i}]", budget) for i, raw in enumerate(images)]


def _chat_parts(text: str, request: HasMedia, limits: Mapping[str, int]) -> list[dict[str, Any]]:
    """OpenAI-style content parts: the text, the decoded images, then videos
    and audios as vLLM decodes them itself (data URL / input_audio)."""
    images = _decoded(request, limits)
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts += [{"type": "image_pil", "image_pil": img} for img in images]
    for item in request.videos:  # valid base64: checked by _decoded
        url = f"data:video/mp4;base64,{_strip_data_url(item)}"
        parts.append({"type": "video_url", "video_url": {"url": url}})
    for item in request.audios:
        data = _strip_data_url(item)
        head = pybase64.b64decode(data[:8])
        fmt = next((f for magic, f in _AUDIO_MAGIC if head.startswith(magic)), "wav")
        parts.append({"type": "input_audio", "input_audio": {"data": data, "format": fmt}})
    return parts


_T = TypeVar("_T")


async def _off_loop(fn: Callable[[], _T]) -> _T:
    return await asyncio.get_running_loop().run_in_executor(_POOL, fn)


async def with_media(
    messages: list[dict[str, Any]], request: HasMedia, limits: Mapping[str, int]
) -> list[dict[str, Any]]:
    """Chat path: `messages` with the request's media as content parts of the
    last user message (a new list: the request's own messages stay as they are)."""
    if not (request.images or request.videos or request.audios):
        return messages
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if message["role"] == "user":
            text: str = message.get("content") or ""
            parts = await _off_loop(partial(_chat_parts, text, request, limits))
            return [*messages[:i], {**message, "content": parts}, *messages[i + 1 :]]
    raise InvalidArgument(
        "Images/Videos/Audios were given but Messages has no user message to carry them"
    )


async def multi_modal_data(request: HasMedia, limits: Mapping[str, int]) -> dict[str, Any]:
    """Raw-prompt path: decoded images for vLLM's `multi_modal_data`."""
    if request.videos or request.audios:
        raise InvalidArgument(
            "Videos/Audios need UseTokenizerTemplate (chat) so the model's placeholders are placed"
        )
    if not request.images:
        return {}
    return {"image": await _off_loop(partial(_decoded, request, limits))}


def processor_error(
    exc: BaseException, images: Sequence[Image], placeholder: str
) -> InvalidArgument | None:
    """vLLM's errors for a caller's media mistake → INVALID_ARGUMENT naming the item.

    * A raw Prompt without the model's placeholder for an item: vLLM asserts
      (`AssertionError: Failed to apply prompt replacement for
      mm_items['image'][0]`), which would be INTERNAL with a traceback.
    * The model's processor refusing an item (PaddleOCR-VL: aspect ratio over
      200): vLLM re-raises as `ValueError("Failed to apply <Processor> on
      data={...} with kwargs={...}")`, the data being PIL reprs and processor
      kwargs; the useful text is the cause's. vLLM processes a request's
      images together, so with several the message lists their sizes.
    None: not one of these.
    """
    import re

    text = str(exc)
    if isinstance(exc, AssertionError) and "Failed to apply prompt replacement" in text:
        hit = re.search(r"mm_items\['(\w+)'\]\[(\d+)\]", text)
        modality, index = (hit.group(1), hit.group(2)) if hit else ("image", "?")
        field = FIELDS.get(modality, modality)
        return InvalidArgument(
            f"{field}[{index}] has no place in Prompt: a raw Prompt must carry the model's "
            f"{modality} placeholder {placeholder!r} once per item (or set UseTokenizerTemplate "
            "with Messages, whose chat template places it)"
        )
    cause = exc.__cause__
    hit = re.match(r"Failed to apply (\w+) on data=", text)
    if isinstance(exc, ValueError) and hit and cause is not None:
        sizes = [f"{img.width}x{img.height}" for img in images]
        if len(sizes) == 1:
            where = f"Images[0] ({sizes[0]})"
        elif sizes:
            where = f"one of Images[0..{len(sizes) - 1}] ({', '.join(sizes)})"
        else:
            where = "the request's media"
        return InvalidArgument(
            f"{where}: the model's processor ({hit.group(1)}) rejected it: {_reason(cause)}"
        )
    return None


def images_in(messages: Sequence[Mapping[str, Any]]) -> list[Image]:
    """The decoded images `with_media` put in a chat, in order."""
    return [
        part["image_pil"]
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image_pil"
    ]
