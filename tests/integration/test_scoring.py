"""Score against log-probabilities computed with transformers on the same model."""

from __future__ import annotations

import grpc
import pytest

from backend.gen import backend_pb2 as pb

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"
CANDIDATES = [" Paris", " Rome and more", "Paris", ' {"json": true}', " ünïcode"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """log p(candidate tokens | prompt) from transformers, same joint tokenization."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    prompt_ids = tok(PROMPT).input_ids
    out = {}
    for cand in CANDIDATES:
        ids = tok(PROMPT + cand).input_ids
        boundary = next(
            (i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b),
            len(prompt_ids),
        )
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values = [logprobs[i - 1, ids[i]].item() for i in range(max(boundary, 1), len(ids))]
        out[cand] = values
    return out


def test_score_matches_transformers(loaded, reference):
    reply = loaded.stub.Score(
        pb.ScoreRequest(
            prompt=PROMPT, candidates=CANDIDATES, include_token_logprobs=True, length_normalize=True
        ),
        timeout=120,
    )
    assert len(reply.candidates) == len(CANDIDATES)
    for cand, got in zip(CANDIDATES, reply.candidates, strict=True):
        expected = reference[cand]
        assert got.num_tokens == len(expected)
        assert got.log_prob == pytest.approx(sum(expected), abs=1e-3)
        assert got.length_normalized_log_prob == pytest.approx(
            sum(expected) / len(expected), abs=1e-3
        )
        assert [t.log_prob for t in got.tokens] == pytest.approx(expected, abs=1e-3)
        assert "".join(t.token for t in got.tokens).strip() in cand or cand.strip().startswith("ü")


def test_score_fills_only_what_its_flags_ask_for(loaded, reference):
    """Without include_token_logprobs no per-token values; without
    length_normalize no normalized score; the sum and count are always there."""
    reply = loaded.stub.Score(pb.ScoreRequest(prompt=PROMPT, candidates=[" Paris"]), timeout=60)
    got = reply.candidates[0]
    assert got.num_tokens == len(reference[" Paris"])
    assert got.log_prob == pytest.approx(sum(reference[" Paris"]), abs=1e-3)
    assert not got.tokens
    assert got.length_normalized_log_prob == 0.0
    reply = loaded.stub.Score(
        pb.ScoreRequest(prompt=PROMPT, candidates=[" Paris"], length_normalize=True), timeout=60
    )
    expected = sum(reference[" Paris"]) / len(reference[" Paris"])
    assert reply.candidates[0].length_normalized_log_prob == pytest.approx(expected, abs=1e-3)
    assert not reply.candidates[0].tokens


def test_score_bad_requests(loaded):
    with pytest.raises(grpc.RpcError) as err:
        loaded.stub.Score(pb.ScoreRequest(prompt=PROMPT), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        loaded.stub.Score(pb.ScoreRequest(prompt="word " * 3000, candidates=["x"]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context" in err.value.details()
