"""all-MiniLM-L6-v2 embeddings through the worker, against transformers'
hidden states pooled as the model's own sentence-transformers config says
(mean over tokens, then L2 normalization); and from token ids: the gateway
sends `EmbeddingTokens` instead of text when the OpenAI client's input is token
arrays, the ids of a text give that text's vector (cosine 1.0), and ids the
model cannot embed are INVALID_ARGUMENT while the worker keeps serving. One
engine start for the module."""

from __future__ import annotations

import json
import math

import grpc
import pytest

from backend.gen import backend_pb2 as pb
from tests.conftest import KV_CACHE_OPTION

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_LEN = 256

TEXTS = [
    "A cat is sleeping on the sofa.",
    "A kitten naps on the couch.",
    "The stock market fell sharply today.",
    "Crème brûlée à Noël, 你好, 世界, 🎉🚀",
    "word " * 100,
]


def _cosine(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.fixture
def embedder(workers, minilm_dir):
    """A pooled worker with all-MiniLM-L6-v2 loaded."""
    options = pb.ModelOptions(
        Model=str(minilm_dir),
        DType="float32",
        MaxModelLen=MAX_LEN,
        EnforceEager=True,
        Embeddings=True,
        Options=[KV_CACHE_OPTION],
    )
    with workers.use(load=options) as w:
        yield w


@pytest.fixture(scope="module")
def reference(minilm_dir):
    """text → (mean-pooled + normalized, CLS + normalized, token count)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    model = AutoModel.from_pretrained(str(minilm_dir), dtype=torch.float32).eval()
    out = {}
    for text in TEXTS:
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids).last_hidden_state[0]
        out[text] = (
            F.normalize(hidden.mean(0), dim=-1).tolist(),
            F.normalize(hidden[0], dim=-1).tolist(),
            hidden.shape[0],
        )
    return out


def test_model_declares_mean_pooling_and_normalize(minilm_dir):
    pooling = json.loads((minilm_dir / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    modules = [m["type"] for m in json.loads((minilm_dir / "modules.json").read_text())]
    assert modules[-1].endswith("Normalize")


def test_embedding_equals_mean_pooling_normalized(embedder, reference):
    for text in TEXTS:
        got = embedder.stub.Embedding(pb.PredictOptions(Embeddings=text), timeout=120)
        mean, cls, n_tokens = reference[text]
        assert got.dim == 384 == len(got.embeddings)
        assert got.prompt_tokens == n_tokens
        assert math.sqrt(sum(x * x for x in got.embeddings)) == pytest.approx(1.0, abs=1e-5)
        assert _cosine(got.embeddings, mean) >= 0.9999, text
        # The model's pooling config was used, not a default CLS pooling.
        assert _cosine(got.embeddings, cls) < 0.99, text


def test_similar_sentences_are_closer(embedder):
    vec = [
        list(embedder.stub.Embedding(pb.PredictOptions(Embeddings=t), timeout=120).embeddings)
        for t in TEXTS[:3]
    ]
    assert _cosine(vec[0], vec[1]) > 0.5 > _cosine(vec[0], vec[2])


# ---- token ids (EmbeddingTokens) ----------------------------------------------


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
