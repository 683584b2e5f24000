"""Embedding from token ids on all-MiniLM-L6-v2 (issue 28): the gateway sends
`EmbeddingTokens` instead of text when the OpenAI client's input is token arrays;
the ids of a text give that text's vector (cosine 1.0), and ids the model cannot
embed are INVALID_ARGUMENT while the worker keeps serving."""

from __future__ import annotations

import math

import grpc
import pytest

from backend.gen import backend_pb2 as pb
from tests.conftest import KV_CACHE_OPTION, Worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXTS = [
    "A cat is sleeping on the sofa.",
    "Crème brûlée à Noël, 你好, 世界, 🎉🚀",
    "word " * 100,
]
MAX_LEN = 256


def _cosine(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.fixture(scope="module")
def embedder(minilm_dir):
    w = Worker()
    try:
        result = w.stub.LoadModel(
            pb.ModelOptions(
                Model=str(minilm_dir),
                DType="float32",
                MaxModelLen=MAX_LEN,
                EnforceEager=True,
                Embeddings=True,
                Options=[KV_CACHE_OPTION],
            ),
            timeout=900,
        )
        assert result.success, f"{result.message}\n{w.log_tail()}"
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="module")
def client_tokenizer(minilm_dir):
    """The client's side: the model's own tokenizer, as an OpenAI client that
    sends token arrays uses it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


def test_token_ids_embed_to_the_same_vector_as_their_text(embedder, client_tokenizer):
    stub = embedder.stub
    for text in TEXTS:
        ids = client_tokenizer(text)["input_ids"]
        assert list(stub.TokenizeString(pb.PredictOptions(Prompt=text), timeout=60).tokens) == ids
        from_text = stub.Embedding(pb.PredictOptions(Embeddings=text), timeout=120)
        from_ids = stub.Embedding(pb.PredictOptions(EmbeddingTokens=ids), timeout=120)
        assert from_ids.dim == from_text.dim == 384
        assert from_ids.prompt_tokens == len(ids) == from_text.prompt_tokens
        assert _cosine(from_ids.embeddings, from_text.embeddings) == pytest.approx(1.0, abs=1e-6)
        assert (
            max(abs(a - b) for a, b in zip(from_ids.embeddings, from_text.embeddings, strict=True))
            < 1e-5
        ), text


def test_ids_are_embedded_as_given_without_special_tokens_added(embedder, client_tokenizer):
    text = TEXTS[0]
    bare = client_tokenizer(text, add_special_tokens=False)["input_ids"]
    got = embedder.stub.Embedding(pb.PredictOptions(EmbeddingTokens=bare), timeout=120)
    assert got.prompt_tokens == len(bare)
    with_specials = embedder.stub.Embedding(pb.PredictOptions(Embeddings=text), timeout=120)
    assert _cosine(got.embeddings, with_specials.embeddings) < 0.999999


@pytest.mark.parametrize(
    ("request_fields", "words"),
    [
        ({"EmbeddingTokens": [101, 30522, 102]}, "outside the vocabulary (0..30521): [30522]"),
        ({"EmbeddingTokens": [101, -7, 102]}, "[-7]"),
        ({"EmbeddingTokens": [101] * (MAX_LEN + 1)}, "over the context length 256"),
        ({"EmbeddingTokens": [101, 102], "Embeddings": "text"}, "not both"),
    ],
)
def test_ids_the_model_cannot_embed_are_invalid_argument(embedder, request_fields, words):
    with pytest.raises(grpc.RpcError) as e:
        embedder.stub.Embedding(pb.PredictOptions(**request_fields), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in e.value.details()
    still = embedder.stub.Embedding(pb.PredictOptions(EmbeddingTokens=[101, 102]), timeout=60)
    assert still.dim == 384
