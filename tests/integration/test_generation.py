"""Generation over a real gRPC channel against the real vLLM engine (tiny model)."""

from __future__ import annotations

import json
import threading
import time

import grpc
import psutil
import pytest

from backend.gen import backend_pb2 as pb
from tests import engine_control

pytestmark = pytest.mark.integration

PROMPT = "The weather in Paris is"


def greedy(**kw) -> pb.PredictOptions:
    base = dict(Prompt=PROMPT, Tokens=24, Temperature=0.0, IgnoreEOS=True)
    base.update(kw)
    return pb.PredictOptions(**base)


def test_predict_returns_text_usage_and_timings(loaded):
    sent = time.monotonic()
    reply = loaded.stub.Predict(greedy(), timeout=60)
    wall_ms = (time.monotonic() - sent) * 1000.0
    assert reply.message
    assert reply.tokens == 24
    assert reply.prompt_tokens == len(
        loaded.stub.TokenizeString(pb.PredictOptions(Prompt=PROMPT)).tokens
    )
    # Both phases took time, and together no more than the call as the client saw it.
    assert reply.timing_prompt_processing > 0
    assert reply.timing_token_generation > 0
    assert reply.timing_prompt_processing + reply.timing_token_generation <= wall_ms
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


def test_cancelled_stream_aborts_its_engine_request(loaded):
    """Cancel a stream the engine core, stopped, provably has not finished: vLLM's
    request table (what Status reads) must empty while the core cannot run (the
    proof, shared with the e2e harness, is in engine_control)."""
    _wait_state(loaded, pb.StatusResponse.READY)
    core = engine_control.engine_core_of(loaded.proc.pid)
    seen = engine_control.cancel_aborts_engine_request(
        loaded.stub,
        core,
        greedy(Tokens=2000, CorrelationId="cancelled"),
        log_path=loaded.log_path,
    )
    print(f"\ncancel: {seen}")
    assert loaded.stub.Predict(greedy(Tokens=4), timeout=60).tokens == 4
    _wait_state(loaded, pb.StatusResponse.READY)


def test_deadline_on_unary_predict_aborts_the_request(loaded):
    """The deadline passes while the engine core is stopped (the request
    provably unfinished); READY must follow with the core still stopped."""
    _wait_state(loaded, pb.StatusResponse.READY)
    core = engine_control.engine_core_of(loaded.proc.pid)
    with engine_control.stopped(core):
        with pytest.raises(grpc.RpcError) as err:
            loaded.stub.Predict(greedy(Tokens=2000), timeout=1.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_state(loaded, pb.StatusResponse.READY, timeout=2.0)
        assert core.status() == psutil.STATUS_STOPPED
    assert loaded.stub.Predict(greedy(Tokens=4), timeout=60).tokens == 4


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
    """Checked against the tree as this test sees it (psutil, from outside)."""
    status = loaded.stub.Status(pb.HealthMessage(), timeout=10)
    worker = psutil.Process(loaded.proc.pid)
    tree = [worker, *worker.children(recursive=True)]
    measured = sum(p.memory_info().rss for p in tree)
    breakdown = dict(status.memory.breakdown)
    core = engine_control.engine_core_of(loaded.proc.pid)
    # Every process of the tree, under its name and pid: the worker, the engine core ...
    assert f"{worker.name()}:{worker.pid}" in breakdown, breakdown
    assert f"{core.name()}:{core.pid}" in breakdown, breakdown
    assert set(breakdown) <= {f"{p.name()}:{p.pid}" for p in tree}, breakdown
    # ... each the process's own RSS, summing to about what psutil sees now
    # (RSS moves between the two looks; the engine core alone is > 100 MiB).
    assert all(v > 0 for v in breakdown.values()), breakdown
    assert breakdown[f"{core.name()}:{core.pid}"] > 100 * 2**20
    assert abs(status.memory.total - measured) < 0.2 * measured, (status.memory.total, measured)
    assert status.memory.total == sum(breakdown.values())
