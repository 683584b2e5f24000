"""backend/pooling.py's EmbeddingTokens check (issue 28): ids are embedded as given,
and every id the model cannot embed is refused before the engine sees it. The
real model's side (the same vector as the text) is tests/realmodel/test_minilm_tokens.py."""

from __future__ import annotations

import pytest

from backend.errors import InvalidArgument
from backend.pooling import token_prompt


def test_ids_go_to_the_engine_as_they_are():
    assert token_prompt([101, 7592, 102], 30522, 256) == {"prompt_token_ids": [101, 7592, 102]}


@pytest.mark.parametrize(
    ("ids", "words"),
    [
        ([101, 30522], "outside the vocabulary (0..30521): [30522]"),
        ([-1, 5], "outside the vocabulary (0..30521): [-1]"),
        ([2**31 - 1], "[2147483647]"),
        ([1] * 257, "257 ids, over the context length 256"),
    ],
)
def test_ids_the_model_cannot_embed_are_invalid_argument(ids, words):
    with pytest.raises(InvalidArgument, match="EmbeddingTokens") as e:
        token_prompt(ids, 30522, 256)
    assert words in e.value.message
