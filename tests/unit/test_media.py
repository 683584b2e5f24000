import base64
import io

import pytest

from backend.errors import InvalidArgument
from backend.media import content_parts, multi_modal_data, with_media


def _png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_media_become_content_parts_on_the_last_user_message():
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "what is this?"},
    ]
    wav = base64.b64encode(b"RIFF....WAVEfmt ").decode()
    before = [dict(m) for m in messages]
    out = with_media(messages, [_png()], [], [wav])
    assert messages == before, "the request's messages are not changed"
    parts = out[2]["content"]
    assert parts[0] == {"type": "text", "text": "what is this?"}
    assert parts[1]["type"] == "image_url"
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[2] == {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}
    assert out[0]["content"] == "first" and out[1] == messages[1]


def test_data_urls_are_accepted():
    parts = content_parts("", ["data:image/png;base64," + _png()], [], [])
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")


@pytest.mark.parametrize(
    ("images", "fragment"),
    [
        (["not base64!!"], "Images\\[0\\] is not valid base64"),
        ([base64.b64encode(b"hello, not an image").decode()], "not a decodable image"),
        ([""], "Images\\[0\\] is empty"),
    ],
)
def test_bad_images_are_rejected_naming_the_item(images, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        content_parts("x", images, [], [])


def test_media_without_a_user_message_is_an_error():
    with pytest.raises(InvalidArgument, match="no user message"):
        with_media([{"role": "system", "content": "s"}], [_png()], [], [])


def test_raw_prompt_images_are_decoded_for_the_engine():
    data = multi_modal_data([_png()], [], [])
    assert data["image"][0].size == (4, 4)
    with pytest.raises(InvalidArgument, match="UseTokenizerTemplate"):
        multi_modal_data([], [], ["AAAA"])
