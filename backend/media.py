"""Base64 media from PredictOptions (Images / Videos / Audios) → vLLM inputs.

For chat requests the media become OpenAI content parts on the last user
message, so the chat template places the model's own placeholders (without
them the media would reach the engine with no placeholder in the prompt).
For raw prompts they become `multi_modal_data`; the prompt must then carry
the model's placeholders itself. Everything is validated here so bad input is
an INVALID_ARGUMENT naming the item, not an engine error.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from typing import Any

from backend.errors import InvalidArgument

_AUDIO_MAGIC = (
    (b"RIFF", "wav"),
    (b"ID3", "mp3"),
    (b"\xff\xfb", "mp3"),
    (b"fLaC", "flac"),
    (b"OggS", "ogg"),
)


def _strip_data_url(text: str) -> str:
    """Accept a bare base64 string or a `data:...;base64,` URL."""
    text = text.strip()
    if text.startswith("data:") and "," in text:
        return text.split(",", 1)[1]
    return text


def decode(item: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(_strip_data_url(item), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{what} is not valid base64") from None
    if not raw:
        raise InvalidArgument(f"{what} is empty")
    return raw


def image_mime(raw: bytes, what: str) -> str:
    """The image's MIME type, checking it really decodes as an image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.verify()
            fmt = img.format or ""
    except Exception as e:  # PIL raises many types for undecodable data
        raise InvalidArgument(f"{what} is not a decodable image ({type(e).__name__})") from None
    return Image.MIME.get(fmt, "image/png")


def content_parts(
    text: str, images: Sequence[str], videos: Sequence[str], audios: Sequence[str]
) -> list[dict[str, Any]]:
    """OpenAI content parts: the text, then each medium as a data URL."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for i, item in enumerate(images):
        raw = decode(item, f"Images[{i}]")
        url = f"data:{image_mime(raw, f'Images[{i}]')};base64,{base64.b64encode(raw).decode()}"
        parts.append({"type": "image_url", "image_url": {"url": url}})
    for i, item in enumerate(videos):
        raw = decode(item, f"Videos[{i}]")
        parts.append(
            {
                "type": "video_url",
                "video_url": {"url": f"data:video/mp4;base64,{base64.b64encode(raw).decode()}"},
            }
        )
    for i, item in enumerate(audios):
        raw = decode(item, f"Audios[{i}]")
        fmt = next((f for magic, f in _AUDIO_MAGIC if raw.startswith(magic)), "wav")
        parts.append(
            {
                "type": "input_audio",
                "input_audio": {"data": base64.b64encode(raw).decode(), "format": fmt},
            }
        )
    return parts


def with_media(
    messages: list[dict[str, Any]],
    images: Sequence[str],
    videos: Sequence[str],
    audios: Sequence[str],
) -> list[dict[str, Any]]:
    """`messages` with the media as content parts of the last user message
    (a new list: the request's own messages are left as they are)."""
    if not (images or videos or audios):
        return messages
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if message["role"] == "user":
            parts = content_parts(message.get("content") or "", images, videos, audios)
            return [*messages[:i], {**message, "content": parts}, *messages[i + 1 :]]
    raise InvalidArgument(
        "Images/Videos/Audios were given but Messages has no user message to carry them"
    )


def multi_modal_data(
    images: Sequence[str], videos: Sequence[str], audios: Sequence[str]
) -> dict[str, Any]:
    """Raw-prompt media: decoded images (PIL) for vLLM's multi_modal_data."""
    if videos or audios:
        raise InvalidArgument(
            "Videos/Audios need UseTokenizerTemplate (chat) so the model's placeholders are placed"
        )
    from PIL import Image

    out = []
    for i, item in enumerate(images):
        raw = decode(item, f"Images[{i}]")
        image_mime(raw, f"Images[{i}]")
        out.append(Image.open(io.BytesIO(raw)).convert("RGB"))
    return {"image": out} if out else {}
