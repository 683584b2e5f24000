"""Generation over a real gRPC channel against the real vLLM engine (tiny model)."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest

from backend.gen import backend_pb2 as pb

pytestmark = pytest.mark.integration

PROMPT = "The weather in Paris is"


def greedy(**kw) -> pb.PredictOptions:
    base = dict(Prompt=PROMPT, Tokens=24, Temperature=0.0, IgnoreEOS=True)
    base.update(kw)
    return pb.PredictOptions(**base)


def test_predict_returns_text_usage_and_timings(loaded):
    reply = loaded.stub.Predict(greedy(), timeout=60)
    assert reply.message
    assert reply.tokens == 24
    assert reply.prompt_tokens == len(
        loaded.stub.TokenizeString(pb.PredictOptions(Prompt=PROMPT)).tokens
    )
    assert reply.timing_token_generation > 0
    assert reply.timing_prompt_processing >= 0
    assert not reply.chat_deltas  # a raw prompt is not a chat


def test_stream_concatenation_equals_unary_greedy_text(loaded):
    unary = loaded.stub.Predict(greedy(Tokens=40), timeout=60)
    chunks = list(loaded.stub.PredictStream(greedy(Tokens=40), timeout=60))
    assert len(chunks) > 2, "tokens must arrive as deltas, not one block"
    text = b"".join(c.message for c in chunks)
    assert text == unary.message
    final = chunks[-1]
    assert final.tokens == 40 and final.prompt_tokens == unary.prompt_tokens
    assert all(c.tokens == 0 for c in chunks[:-1]), "usage only on the final reply"


def test_unset_tokens_generates_to_the_context_limit(loaded):
    prompt_len = len(loaded.stub.TokenizeString(pb.PredictOptions(Prompt=PROMPT)).tokens)
    reply = loaded.stub.Predict(greedy(Tokens=0), timeout=300)
    assert reply.tokens == 2048 - prompt_len


def test_tokens_beyond_the_context_are_clamped_like_vllm_serve(loaded):
    prompt_len = len(loaded.stub.TokenizeString(pb.PredictOptions(Prompt=PROMPT)).tokens)
    assert loaded.stub.Predict(greedy(Tokens=100000), timeout=300).tokens == 2048 - prompt_len


def test_stop_strings_end_generation(loaded):
    full = loaded.stub.Predict(greedy(Tokens=40), timeout=60).message.decode()
    stop = full[10:14]
    cut = loaded.stub.Predict(greedy(Tokens=40, StopPrompts=[stop]), timeout=60).message.decode()
    assert stop not in cut and full.startswith(cut)


def test_seeded_sampling_is_reproducible(loaded):
    req = greedy(Temperature=1.0, TopK=50, TopP=0.9, Seed=1234)
    assert (
        loaded.stub.Predict(req, timeout=60).message == loaded.stub.Predict(req, timeout=60).message
    )


def test_logit_bias_forces_a_token(loaded):
    target = loaded.stub.TokenizeString(pb.PredictOptions(Prompt=" sunny")).tokens[0]
    reply = loaded.stub.Predict(
        greedy(Tokens=3, LogitBias=json.dumps({str(target): 100})), timeout=60
    )
    assert loaded.stub.TokenizeString(pb.PredictOptions(Prompt=reply.message.decode())).tokens[
        :1
    ] == [target]


def test_logprobs_in_openai_format_streamed_and_final(loaded):
    chunks = list(
        loaded.stub.PredictStream(greedy(Tokens=8, Logprobs=1, TopLogprobs=3), timeout=60)
    )
    final = json.loads(chunks[-1].logprobs)
    assert len(final["content"]) == 8
    first = final["content"][0]
    assert set(first) == {"token", "logprob", "bytes", "top_logprobs"}
    assert len(first["top_logprobs"]) == 3
    assert first["logprob"] == pytest.approx(first["top_logprobs"][0]["logprob"])  # greedy
    per_chunk = [e for c in chunks[:-1] if c.logprobs for e in json.loads(c.logprobs)["content"]]
    assert [e["token"] for e in per_chunk] == [e["token"] for e in final["content"]][
        : len(per_chunk)
    ]
    # Chunks before the final one carry their own tokens' logprobs; the final
    # Reply carries the whole completion's (what the gateway keeps).
    assert 1 <= len(per_chunk) < 8


def test_tokenize_detokenize_round_trip(loaded):
    text = 'Hello, world! {"a": [1, 2]} ünïcödé'
    ids = loaded.stub.TokenizeString(pb.PredictOptions(Prompt=text)).tokens
    assert ids and loaded.stub.TokenizeString(pb.PredictOptions(Prompt=text)).length == len(ids)
    assert loaded.stub.Detokenize(pb.DetokenizeRequest(tokens=ids)).content == text


def test_detokenize_out_of_vocabulary_is_invalid(loaded):
    with pytest.raises(grpc.RpcError) as err:
        loaded.stub.Detokenize(pb.DetokenizeRequest(tokens=[10**7]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "out of vocabulary" in err.value.details()


@pytest.mark.parametrize(
    ("request_kw", "fragment"),
    [
        (dict(Temperature=-1.0), "Temperature"),
        (dict(TopP=2.0), "TopP"),
        (dict(Tokens=-5), "Tokens"),
        (dict(LogitBias="{oops"), "LogitBias"),
        (dict(Prompt=""), "Prompt is empty"),
        (dict(Prompt="word " * 3000), ""),
        (dict(Grammar="root ::= ("), ""),
    ],
)
def test_bad_requests_are_invalid_argument_and_the_worker_keeps_serving(
    loaded, request_kw, fragment
):
    with pytest.raises(grpc.RpcError) as err:
        loaded.stub.Predict(greedy(**request_kw), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert fragment in err.value.details()
    assert loaded.stub.Predict(greedy(Tokens=2), timeout=60).tokens == 2


def _state(worker) -> int:
    return worker.stub.Status(pb.HealthMessage(), timeout=10).state


def _wait_state(worker, state: int, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _state(worker) == state:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"state never became {state}")


def _seconds_for(worker, tokens: int) -> float:
    """How long the engine needs for `tokens` tokens right now (the machine
    may be busy: abort checks compare against this, not a fixed time)."""
    started = time.monotonic()
    assert worker.stub.Predict(greedy(Tokens=200), timeout=300).tokens == 200
    return (time.monotonic() - started) * tokens / 200


def test_cancelled_stream_aborts_its_engine_request(loaded):
    """After cancel, the engine's request table (what Status reads) empties
    at once, long before the 2000-token generation could have finished.

    The proof needs the whole attempt (stream start to READY) to be shorter
    than half the generation's own duration; a client stalled by a busy CPU
    can overshoot that, and such an attempt proves nothing, so it is retried."""
    _wait_state(loaded, pb.StatusResponse.READY)
    attempts = []
    for _ in range(3):
        full = _seconds_for(loaded, 2000)
        call = loaded.stub.PredictStream(greedy(Tokens=2000), timeout=300)
        started = time.monotonic()
        for received, _ in enumerate(call, 1):
            if received == 5:
                break
        call.cancel()
        ready_after = _wait_state(loaded, pb.StatusResponse.READY, timeout=60)
        took = time.monotonic() - started
        attempts.append((round(took, 3), round(ready_after, 3), round(full, 3)))
        if took < full / 2:
            assert ready_after < 2.0, attempts
            return
    pytest.fail(f"no conclusive attempt (took, ready_after, full): {attempts}")


def test_deadline_on_unary_predict_aborts_the_request(loaded):
    _wait_state(loaded, pb.StatusResponse.READY)
    full = _seconds_for(loaded, 2000)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        loaded.stub.Predict(greedy(Tokens=2000), timeout=min(1.0, full / 4))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_state(loaded, pb.StatusResponse.READY, timeout=60)
    assert time.monotonic() - started < max(2.0, full / 2), full


def test_concurrent_streams_get_their_own_text(loaded):
    prompts = ["The cat", "A dog ran", "In 1999 the", 'JSON: {"a":']
    expected = {
        p: loaded.stub.Predict(greedy(Prompt=p, Tokens=30), timeout=60).message for p in prompts
    }
    got: dict[str, bytes] = {}

    def run(p: str) -> None:
        got[p] = b"".join(
            c.message for c in loaded.stub.PredictStream(greedy(Prompt=p, Tokens=30), timeout=60)
        )

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts * 1]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_status_reports_memory_of_the_process_tree(loaded):
    status = loaded.stub.Status(pb.HealthMessage(), timeout=10)
    assert status.memory.total > 100 * 2**20
    assert len(status.memory.breakdown) >= 2, "worker plus engine-core process"
    assert sum(status.memory.breakdown.values()) == status.memory.total
