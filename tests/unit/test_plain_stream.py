"""A stream with no parser and no logprobs skips feed/ChatPiece (generation.run's
plain path): it must send exactly the Replies the general path sends."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from backend import generation, replies
from backend.output.state import OutputState

TEXTS = ["Hello", " ", "wor", "", "ld", "\n", " caf\u00e9", " \U0001f600", "."]


class FakeEngine:
    closing = ""

    async def generate(self, *args: Any, **kwargs: Any) -> Any:
        for i, text in enumerate(TEXTS):
            await asyncio.sleep(0)
            last = i == len(TEXTS) - 1
            completion = SimpleNamespace(
                text=text, token_ids=[100 + i] if text else [], logprobs=None,
                finish_reason="length" if last else None,
            )  # fmt: skip
            yield SimpleNamespace(
                outputs=[completion], prompt_token_ids=[1, 2], finished=last, metrics=None
            )

    def ensure_complete(self, out: Any) -> Any:
        return out


def stream(chat: bool, plain: bool, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    monkeypatch.setattr(OutputState, "plain", property(lambda self: plain))
    sent: list[bytes] = []

    async def send(reply: Any) -> None:
        sent.append(reply.SerializeToString())

    gen = generation.Generation(None, None, OutputState(None, None), chat, {})
    final = asyncio.run(
        generation.run(FakeEngine(), gen, "r", send, count=lambda p, c: None)  # type: ignore[arg-type]
    )
    final.ClearField("timing_prompt_processing")
    final.ClearField("timing_token_generation")
    return [*sent, final.SerializeToString()]


@pytest.mark.parametrize("chat", [False, True])
def test_the_plain_path_sends_what_the_general_path_sends(chat, monkeypatch):
    fast = stream(chat, True, monkeypatch)
    general = stream(chat, False, monkeypatch)
    assert fast == general
    assert len(fast) == len([t for t in TEXTS[:-1] if t]) + 1


@pytest.mark.parametrize("text", ["x", " caf\u00e9", "\U0001f600"])
@pytest.mark.parametrize("chat", [False, True])
def test_text_reply_is_reply_of_a_content_piece(text, chat):
    piece = replies.ChatPiece(content=text)
    assert replies.text_reply(text, chat=chat) == replies.reply(piece, chat=chat)


def test_a_lone_surrogate_in_raw_text_is_sent_as_the_general_path_sends_it():
    piece = replies.ChatPiece(content="\udcff")
    assert replies.text_reply("\udcff", chat=False) == replies.reply(piece, chat=False)


def test_plain_means_no_parser_and_no_logprobs():
    assert OutputState(None, None).plain
    sink = SimpleNamespace(add=lambda *a: None)
    assert not OutputState(None, None, logprobs=sink).plain  # type: ignore[arg-type]
