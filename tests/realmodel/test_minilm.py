"""all-MiniLM-L6-v2 embeddings through the worker, against transformers'
hidden states pooled as the model's own sentence-transformers config says
(mean over tokens, then L2 normalization)."""

from __future__ import annotations

import json
import math

import pytest

from backend.gen import backend_pb2 as pb
from tests.conftest import KV_CACHE_OPTION

pytestmark = [pytest.mark.integration, pytest.mark.slow]

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
        MaxModelLen=256,
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
