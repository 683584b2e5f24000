"""Encoder models: a tiny BERT embedder and a tiny BERT cross-encoder, both
built locally, checked against transformers."""

from __future__ import annotations

import math

import grpc
import pytest

from backend.gen import backend_pb2 as pb
from tests.conftest import KV_CACHE_OPTION, Workers

pytestmark = pytest.mark.integration

TEXTS = ["the weather in paris is sunny", "a cat sat on the mat", "json keys and values"]
QUERY = "weather in paris"
DOCS = ["paris weather is sunny today", "cats like mats", "the capital of france", "rain in rome"]


def _options(model_dir, **fields) -> pb.ModelOptions:
    return pb.ModelOptions(
        Model=str(model_dir),
        DType="float32",
        MaxModelLen=512,
        EnforceEager=True,
        Options=[KV_CACHE_OPTION],
        **fields,
    )


@pytest.fixture
def bert_worker(workers: Workers):
    """A pooled worker with no model loaded: each test loads its BERT model."""
    with workers.use() as w:
        yield w


def test_bert_embeddings_match_sentence_transformers_pooling(bert_worker):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from tools.tiny_bert import build_tiny_bert, default_bert_dir

    model_dir = build_tiny_bert(default_bert_dir("embed"), kind="embed")
    result = bert_worker.stub.LoadModel(_options(model_dir, Embeddings=True), timeout=300)
    assert result.success, f"{result.message}\n{bert_worker.log_tail()}"
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for text in TEXTS:
        got = bert_worker.stub.Embedding(pb.PredictOptions(Embeddings=text), timeout=60)
        with torch.no_grad():
            hidden = model(**tok(text, return_tensors="pt")).last_hidden_state[0]
        # The model's modules.json: mean pooling, then L2 normalization.
        expected = F.normalize(hidden.mean(0), dim=-1).tolist()
        assert got.dim == 128 and got.tokens == 1
        assert math.sqrt(sum(x * x for x in got.embeddings)) == pytest.approx(1.0, abs=1e-5)
        assert got.embeddings == pytest.approx(expected, abs=1e-4)


def test_rerank_scores_and_orders_documents_like_transformers(bert_worker):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tools.tiny_bert import build_tiny_bert, default_bert_dir

    model_dir = build_tiny_bert(default_bert_dir("rerank"), kind="rerank")
    result = bert_worker.stub.LoadModel(_options(model_dir, Reranking=True), timeout=300)
    assert result.success, f"{result.message}\n{bert_worker.log_tail()}"
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), dtype=torch.float32
    ).eval()
    expected = []
    for doc in DOCS:
        with torch.no_grad():
            logit = model(**tok(QUERY, doc, return_tensors="pt")).logits[0, 0]
        expected.append(torch.sigmoid(logit).item())

    reply = bert_worker.stub.Rerank(pb.RerankRequest(query=QUERY, documents=DOCS), timeout=60)
    assert [r.index for r in reply.results] == sorted(range(len(DOCS)), key=lambda i: -expected[i])
    for r in reply.results:
        assert r.relevance_score == pytest.approx(expected[r.index], abs=1e-4)
        assert r.text == DOCS[r.index]
    assert reply.usage.total_tokens == sum(len(tok(QUERY, d).input_ids) for d in DOCS)

    top = bert_worker.stub.Rerank(
        pb.RerankRequest(query=QUERY, documents=DOCS, top_n=2), timeout=60
    )
    assert [r.index for r in top.results] == [r.index for r in reply.results][:2]
    with pytest.raises(grpc.RpcError) as err:
        bert_worker.stub.Rerank(pb.RerankRequest(query=QUERY), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        bert_worker.stub.Rerank(
            pb.RerankRequest(query=QUERY, documents=[DOCS[0], "word " * 600]), timeout=60
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "documents[1]" in err.value.details() and "context" in err.value.details()


def test_rerank_on_a_generation_model_is_failed_precondition(loaded):
    with pytest.raises(grpc.RpcError) as err:
        loaded.stub.Rerank(pb.RerankRequest(query="q", documents=["d"]), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Reranking=true" in err.value.details()
