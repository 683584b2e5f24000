"""Embeddings through the pooling runner, checked against transformers."""

from __future__ import annotations

import grpc
import pytest

from backend.gen import backend_pb2 as pb
from tests.conftest import Workers, tiny_load_options

pytestmark = pytest.mark.integration

TEXTS = ["The weather in Paris is sunny.", "Bonjour, ça va ?", '{"json": [1, 2, 3]}']


@pytest.fixture
def embedder(workers: Workers, tiny_model_dir):
    """A pooled worker with the tiny model loaded as a pooling model."""
    with workers.use(load=tiny_load_options(tiny_model_dir, Embeddings=True)) as w:
        yield w


def _cosine(a, b) -> float:
    import math

    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Last-token hidden state of the decoder (vLLM's pooling for a converted
    causal LM), from transformers."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    out = {}
    for text in TEXTS:
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids).last_hidden_state[0]
        out[text] = (hidden[-1].tolist(), hidden.tolist())
    return out


def test_pooled_embedding_matches_transformers(embedder, reference):
    for text in TEXTS:
        result = embedder.stub.Embedding(pb.PredictOptions(Embeddings=text), timeout=60)
        assert result.layout == pb.EMBEDDING_LAYOUT_FINAL
        assert result.tokens == 1 and result.dim == 128 == len(result.embeddings)
        assert result.prompt_tokens == len(reference[text][1])
        assert _cosine(result.embeddings, reference[text][0]) > 0.999


def test_per_token_layout(embedder, reference):
    text = TEXTS[0]
    result = embedder.stub.Embedding(
        pb.PredictOptions(Embeddings=text, Metadata={"embedding_layout": "per_token"}), timeout=60
    )
    rows = reference[text][1]
    assert result.layout == pb.EMBEDDING_LAYOUT_PER_TOKEN
    assert (result.tokens, result.dim) == (len(rows), 128)
    assert len(result.embeddings) == result.tokens * result.dim
    for i, row in enumerate(rows):
        assert _cosine(result.embeddings[i * 128 : (i + 1) * 128], row) > 0.999


def test_embedding_errors_and_no_generation_on_a_pooling_load(embedder):
    with pytest.raises(grpc.RpcError) as err:
        embedder.stub.Embedding(pb.PredictOptions(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        embedder.stub.Embedding(
            pb.PredictOptions(Embeddings="x", Metadata={"embedding_layout": "diagonal"}), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        embedder.stub.Predict(pb.PredictOptions(Prompt="hi", Tokens=2), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot generate" in err.value.details()


def test_embedding_on_a_generation_load_is_failed_precondition(loaded):
    with pytest.raises(grpc.RpcError) as err:
        loaded.stub.Embedding(pb.PredictOptions(Embeddings="hi"), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Embeddings=true" in err.value.details()
