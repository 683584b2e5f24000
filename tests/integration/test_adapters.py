"""LoRA adapters and load-time configuration against the real engine."""

from __future__ import annotations

import json

import grpc
import pytest

from backend.gen import backend_pb2 as pb
from tests.conftest import Workers, tiny_load_options

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from tools.tiny_model import build_tiny_lora

    return build_tiny_lora(tmp_path_factory.mktemp("lora") / "style")


@pytest.fixture
def lora_worker(workers: Workers, tiny_model_dir, adapter):
    """A pooled worker with the adapter loaded at full strength (the scale test
    reloads it with another scale: the pool reloads for the next test)."""
    options = tiny_load_options(tiny_model_dir, LoraAdapter=str(adapter), LoraScale=1.0)
    with workers.use(load=options) as w:
        yield w, adapter


def _greedy(stub, **metadata):
    req = pb.PredictOptions(
        Prompt="The weather in Paris is", Tokens=16, IgnoreEOS=True, Metadata=metadata
    )
    return stub.Predict(req, timeout=120).message


def test_lora_changes_the_output_and_can_be_turned_off_per_request(lora_worker):
    worker, _ = lora_worker
    with_lora = _greedy(worker.stub)
    assert _greedy(worker.stub, lora_adapter="style") == with_lora
    without = _greedy(worker.stub, lora_adapter="none")
    assert with_lora != without


def test_unknown_adapter_name_is_invalid(lora_worker):
    worker, _ = lora_worker
    with pytest.raises(grpc.RpcError) as err:
        _greedy(worker.stub, lora_adapter="nope")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "style" in err.value.details()


def _first_token_logprobs(stub, **metadata) -> dict[str, float]:
    req = pb.PredictOptions(
        Prompt="The weather in Paris is", Tokens=1, Logprobs=1, TopLogprobs=5, Metadata=metadata
    )
    entry = json.loads(stub.Predict(req, timeout=120).logprobs)["content"][0]
    return {t["token"]: t["logprob"] for t in entry["top_logprobs"]}


def test_lora_scale_scales_the_adapters_effect(lora_worker, tiny_model_dir):
    """A tiny LoraScale brings the next-token distribution back to the base model's."""
    worker, adapter = lora_worker
    base = _first_token_logprobs(worker.stub, lora_adapter="none")
    full = _first_token_logprobs(worker.stub)
    result = worker.stub.LoadModel(
        tiny_load_options(tiny_model_dir, LoraAdapter=str(adapter), LoraScale=0.001), timeout=300
    )
    assert result.success, result.message
    tiny = _first_token_logprobs(worker.stub)

    # Full strength moves the distribution far (here: a different top 5);
    # scale 0.001 leaves it within a few hundredths of the base model's.
    assert set(full) != set(base)
    shared = set(tiny) & set(base)
    assert len(shared) >= 3
    assert max(abs(tiny[t] - base[t]) for t in shared) < 0.05


@pytest.mark.long
def test_draft_model_speculative_decoding_is_lossless(lora_worker, tiny_model_dir, loaded):
    """The tiny model as its own draft: vLLM runs draft-model speculation on
    CPU, and greedy output is exactly the non-speculative output."""
    worker, _ = lora_worker
    expected = _greedy(loaded.stub)
    result = worker.stub.LoadModel(
        tiny_load_options(tiny_model_dir, DraftModel=str(tiny_model_dir)), timeout=300
    )
    assert result.success, result.message
    assert _greedy(worker.stub) == expected
    assert "SpeculativeConfig(method='draft_model'" in worker.log_tail(400)
