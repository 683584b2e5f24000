# The table below is one row per line on purpose (fmt: off), so lines run long.
# ruff: noqa: E501
"""Bad and hostile input across the RPCs: a precise status, never a crash.

One table: each row is an RPC, a bad request and the answer the gateway must
get (gRPC code plus a fragment of the message naming the problem, or
LoadModel's success=false). Requests go to a worker with the tiny model
loaded (chat parsers on) or, for what must happen before any LoadModel, to
a fresh worker. After the table, both workers still serve.

Also here: ModelIdentity checks, and LoadModel with bad options on a
worker that is serving.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from backend.gen import backend_pb2 as pb
from tests.conftest import Worker, tiny_load_options
from tests.integration.chat_helpers import WEATHER_TOOL
from tests.reliability.helpers import greedy, load, state

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

LOAD_FAILS = "LoadModel success=false"


# `loaded` (tests/conftest.py): a pooled worker with the tiny model and CHAT_OPTIONS.


@pytest.fixture
def fresh(workers):
    """A pooled worker with no model loaded (its last load may have failed)."""
    with workers.use() as worker:
        yield worker


# ---- request builders ----------------------------------------------------------------


def chat(messages=None, **kw) -> pb.PredictOptions:
    msgs = messages if messages is not None else [{"role": "user", "content": "Weather?"}]
    return pb.PredictOptions(
        UseTokenizerTemplate=True,
        Messages=[pb.Message(**m) for m in msgs],
        Tokens=4,
        Temperature=0.0,
        **kw,
    )


def with_tools(**kw) -> pb.PredictOptions:
    return chat(Tools=json.dumps([WEATHER_TOOL]), **kw)


def assistant_calls(tool_calls: str) -> pb.PredictOptions:
    return chat(
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": tool_calls},
            {"role": "user", "content": "And now?"},
        ],
        Tools=json.dumps([WEATHER_TOOL]),
    )


def raw_with_invalid_utf8(message: Any, marker: str) -> bytes:
    """The serialized message with `marker` (inside a string field) replaced by
    invalid UTF-8 of the same length: what a buggy or hostile non-Python client
    can send, since proto3 strings are only checked when parsed."""
    data = message.SerializeToString()
    bad = b"\xff\xfe" * (len(marker) // 2)
    assert len(bad) == len(marker) and data.count(marker.encode()) == 1
    return data.replace(marker.encode(), bad)


MARK = "UTF8MARK"  # 8 bytes, replaced by invalid UTF-8

# ---- the table --------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    rpc: str  # Predict | PredictStream | TokenizeString | Detokenize | LoadModel | Embedding
    request: Callable[[Any], Any]  # model dir → request (message, or raw bytes)
    code: grpc.StatusCode | str
    fragment: str
    fresh: bool = False  # send to the worker that has no model


IA = grpc.StatusCode.INVALID_ARGUMENT
FP = grpc.StatusCode.FAILED_PRECONDITION


def _load(*options: str, **fields) -> Callable[[Any], pb.ModelOptions]:
    return lambda model_dir: tiny_load_options(model_dir, *options, **fields)


def _req(message: Any) -> Callable[[Any], Any]:
    return lambda _model_dir: message


# fmt: off
TABLE: list[Any] = [
    # -- chat structure
    Case("tools-malformed-json", "Predict", _req(chat(Tools="[{")), IA, "Tools is not valid JSON"),
    Case("tools-not-an-array", "Predict", _req(chat(Tools='{"type": "function"}')), IA, "Tools must be a JSON array"),
    Case("tools-entry-without-name", "PredictStream", _req(chat(Tools='[{"type": "function", "function": {}}]')), IA, "Tools[0]"),
    Case("tools-parameters-not-object", "Predict", _req(chat(Tools='[{"type": "function", "function": {"name": "f", "parameters": [1]}}]')), IA, "parameters"),
    Case("tools-deeply-nested", "Predict", _req(chat(Tools="[" * 100_000)), IA, "Tools"),
    Case("tool-calls-malformed-json", "Predict", _req(assistant_calls("{oops")), IA, "tool_calls is not valid JSON"),
    Case("tool-calls-bad-arguments", "PredictStream", _req(assistant_calls(json.dumps([{"type": "function", "function": {"name": "get_weather", "arguments": "{bad"}}]))), IA, "arguments is not valid JSON"),
    Case("tool-calls-without-function-name", "Predict", _req(assistant_calls('[{"type": "function", "function": {}}]')), IA, "function.name is missing"),
    Case("tool-calls-on-a-user-message", "Predict", _req(chat([{"role": "user", "content": "x", "tool_calls": "[]"}])), IA, "only assistant messages"),
    Case("unknown-role", "Predict", _req(chat([{"role": "wizard", "content": "x"}])), IA, "role 'wizard'"),
    Case("empty-messages-with-template", "PredictStream", _req(chat([])), IA, "Messages is empty"),
    Case("tool-choice-missing-tool", "Predict", _req(with_tools(ToolChoice=json.dumps({"type": "function", "function": {"name": "nope"}}))), IA, "'nope', which is not in Tools"),
    Case("tool-choice-required-without-tools", "Predict", _req(chat(ToolChoice='"required"')), IA, "no Tools"),
    Case("tool-choice-unknown-mode", "Predict", _req(with_tools(ToolChoice='"sometimes"')), IA, "ToolChoice"),
    Case("metadata-template-kwargs-malformed", "Predict", _req(chat(Metadata={"chat_template_kwargs": "{"})), IA, "chat_template_kwargs"),
    Case("metadata-template-kwargs-not-object", "Predict", _req(chat(Metadata={"chat_template_kwargs": "[1]"})), IA, "must be a JSON object"),
    Case("metadata-enable-thinking-not-bool", "PredictStream", _req(chat(Metadata={"enable_thinking": "maybe"})), IA, "enable_thinking"),
    Case("metadata-skip-special-tokens-not-bool", "Predict", _req(chat(Metadata={"skip_special_tokens": "2"})), IA, "skip_special_tokens"),
    Case("images-bad-base64", "Predict", _req(chat(Images=["%%% not base64 %%%"])), IA, "Images"),
    Case("images-not-an-image", "PredictStream", _req(chat(Images=["aGVsbG8gd29ybGQ="])), IA, "Images"),
    # -- structured output
    Case("grammar-invalid", "Predict", _req(greedy(Grammar="root ::= (((")), IA, "grammar"),
    Case("grammar-schema-malformed", "Predict", _req(greedy(Grammar='{"type": "object"')), IA, "JSON schema"),
    Case("grammar-schema-not-object", "Predict", _req(greedy(Grammar="[1, 2]")), IA, "JSON schema must be a JSON object"),
    Case("grammar-schema-invalid-type", "PredictStream", _req(greedy(Grammar='{"type": "no-such-type"}')), IA, ""),
    # -- sampling
    Case("prompt-longer-than-context", "Predict", _req(greedy(Prompt="word " * 3000)), IA, "2048"),
    Case("prompt-longer-than-context-stream", "PredictStream", _req(greedy(Prompt="word " * 3000)), IA, "2048"),
    Case("empty-prompt", "Predict", _req(greedy(Prompt="")), IA, "Prompt is empty"),
    Case("negative-tokens", "Predict", _req(greedy(Tokens=-5)), IA, "Tokens"),
    Case("negative-temperature", "PredictStream", _req(greedy(Temperature=-1.0)), IA, "Temperature"),
    Case("nan-temperature", "Predict", _req(greedy(Temperature=float("nan"))), IA, "finite"),
    Case("top-p-above-one", "Predict", _req(greedy(TopP=1.5)), IA, "TopP"),
    Case("top-p-negative", "Predict", _req(greedy(TopP=-0.5)), IA, "TopP"),
    Case("top-k-negative", "Predict", _req(greedy(TopK=-5)), IA, "TopK"),
    Case("min-p-above-one", "Predict", _req(greedy(MinP=2.0)), IA, "MinP"),
    Case("repetition-penalty-negative", "Predict", _req(greedy(Penalty=-1.0)), IA, "Penalty"),
    Case("frequency-penalty-out-of-range", "Predict", _req(greedy(FrequencyPenalty=3.0)), IA, "FrequencyPenalty"),
    Case("presence-penalty-out-of-range", "PredictStream", _req(greedy(PresencePenalty=-2.5)), IA, "PresencePenalty"),
    Case("top-logprobs-too-many", "Predict", _req(greedy(TopLogprobs=50)), IA, "TopLogprobs"),
    Case("logprobs-negative", "Predict", _req(greedy(Logprobs=-1)), IA, "Logprobs"),
    Case("typical-p-unsupported", "Predict", _req(greedy(TypicalP=0.5)), IA, "TypicalP"),
    Case("logit-bias-malformed", "Predict", _req(greedy(LogitBias="{oops")), IA, "LogitBias is not valid JSON"),
    Case("logit-bias-not-object", "Predict", _req(greedy(LogitBias="[1]")), IA, "LogitBias must be a JSON object"),
    Case("logit-bias-key-not-token", "Predict", _req(greedy(LogitBias='{"abc": 1}')), IA, "not a token id"),
    Case("logit-bias-value-out-of-range", "Predict", _req(greedy(LogitBias='{"5": 500}')), IA, "out of range"),
    Case("logit-bias-token-out-of-vocabulary", "Predict", _req(greedy(LogitBias='{"99999999": 1}')), IA, "99999999"),
    # -- invalid UTF-8 in proto3 strings (raw bytes on the wire): the h2
    # transport decodes requests itself and names the problem (grpc.aio
    # answered UNKNOWN "Unexpected <class DecodeError>" before our code ran)
    Case("invalid-utf8-prompt", "Predict", lambda _m: raw_with_invalid_utf8(greedy(Prompt=MARK), MARK), IA, "UTF-8"),
    Case("invalid-utf8-message-content", "PredictStream", lambda _m: raw_with_invalid_utf8(chat([{"role": "user", "content": MARK}]), MARK), IA, "UTF-8"),
    Case("invalid-utf8-tokenize", "TokenizeString", lambda _m: raw_with_invalid_utf8(pb.PredictOptions(Prompt=MARK), MARK), IA, "UTF-8"),
    Case("invalid-utf8-model-name", "LoadModel", lambda _m: raw_with_invalid_utf8(pb.ModelOptions(Model=MARK), MARK), IA, "UTF-8", fresh=True),
    # -- tokenizer
    Case("detokenize-out-of-vocabulary", "Detokenize", _req(pb.DetokenizeRequest(tokens=[1, 10**7])), IA, "out of vocabulary"),
    Case("detokenize-negative-id", "Detokenize", _req(pb.DetokenizeRequest(tokens=[-1])), IA, "out of vocabulary"),
    # -- model type
    Case("embedding-on-a-generation-model", "Embedding", _req(pb.PredictOptions(Embeddings="hello")), FP, "Embeddings=true"),
    # -- before LoadModel
    Case("predict-before-load", "Predict", _req(greedy()), FP, "LoadModel", fresh=True),
    Case("stream-before-load", "PredictStream", _req(greedy()), FP, "LoadModel", fresh=True),
    Case("tokenize-before-load", "TokenizeString", _req(pb.PredictOptions(Prompt="x")), FP, "LoadModel", fresh=True),
    Case("detokenize-before-load", "Detokenize", _req(pb.DetokenizeRequest(tokens=[1])), FP, "LoadModel", fresh=True),
    Case("embedding-before-load", "Embedding", _req(pb.PredictOptions(Embeddings="x")), FP, "LoadModel", fresh=True),
    # -- LoadModel (on the fresh worker: a bad load never needs an engine)
    Case("load-engine-args-malformed", "LoadModel", _load(EngineArgs="{"), LOAD_FAILS, "EngineArgs is not valid JSON", fresh=True),
    Case("load-engine-args-not-object", "LoadModel", _load(EngineArgs="[1]"), LOAD_FAILS, "EngineArgs must be a JSON object", fresh=True),
    Case("load-engine-args-unknown-key", "LoadModel", _load(EngineArgs='{"max_modl_len": 1}'), LOAD_FAILS, "did you mean 'max_model_len'", fresh=True),
    Case("load-unknown-tool-parser", "LoadModel", _load("tool_parser:nonesuch"), LOAD_FAILS, "unknown tool_parser 'nonesuch'; valid names", fresh=True),
    Case("load-unknown-reasoning-parser", "LoadModel", _load("reasoning_parser:nonesuch"), LOAD_FAILS, "unknown reasoning_parser 'nonesuch'; valid names", fresh=True),
    Case("load-option-without-value", "LoadModel", _load("tool_parser"), LOAD_FAILS, "has no value", fresh=True),
    Case("load-option-with-empty-value", "LoadModel", _load("chat_template:"), LOAD_FAILS, "needs a value", fresh=True),
    Case("load-unknown-engine-flag", "LoadModel", _load("--max-num-seqz:8"), LOAD_FAILS, "did you mean", fresh=True),
    Case("load-bad-flag-value", "LoadModel", _load("--max-num-seqs:many"), LOAD_FAILS, "max-num-seqs", fresh=True),
    Case("load-negative-context", "LoadModel", _load(MaxModelLen=-1), LOAD_FAILS, "MaxModelLen must be >= 0", fresh=True),
    Case("load-gpu-fraction-above-one", "LoadModel", _load(GPUMemoryUtilization=1.5), LOAD_FAILS, "GPUMemoryUtilization", fresh=True),
    Case("load-empty-model", "LoadModel", _load(Model=""), LOAD_FAILS, "Model is empty", fresh=True),
]
# fmt: on


def _call(worker: Worker, rpc: str, request: Any) -> Any:
    if isinstance(request, bytes):
        method = f"/backend.Backend/{rpc}"
        if rpc == "PredictStream":
            return list(worker.channel.unary_stream(method)(request, timeout=60))
        return worker.channel.unary_unary(method)(request, timeout=60)
    if rpc == "PredictStream":
        return list(worker.stub.PredictStream(request, timeout=60))
    return getattr(worker.stub, rpc)(request, timeout=300 if rpc == "LoadModel" else 60)


def _case_id(param: Any) -> str:
    return param.id if isinstance(param, Case) else param.values[0].id


@pytest.mark.parametrize("case", TABLE, ids=[_case_id(c) for c in TABLE])
def test_bad_input_gets_a_precise_answer(case: Case, request, tiny_model_dir):
    assert len(TABLE) >= 30
    worker = request.getfixturevalue("fresh" if case.fresh else "loaded")
    try:
        result = _call(worker, case.rpc, case.request(tiny_model_dir))
    except grpc.RpcError as e:
        got, details = e.code(), e.details() or ""
    else:
        if case.rpc == "LoadModel" and not result.success:
            got, details = LOAD_FAILS, result.message
        else:
            pytest.fail(f"{case.id}: {case.rpc} succeeded: {str(result)[:300]}")
    assert got == case.code, f"{case.id}: {got} {details!r}"
    assert case.fragment.lower() in details.lower(), f"{case.id}: {details!r}"
    # The worker is alive and answering after every row.
    assert worker.stub.Health(pb.HealthMessage(), timeout=10).message == b"OK"


def test_unparsable_requests_do_not_take_the_worker_down(loaded, fresh):
    """The status is INVALID_ARGUMENT (the table checks the message); the worker survives."""
    for worker in (loaded, fresh):
        for rpc, message in (
            ("Predict", greedy(Prompt=MARK)),
            ("PredictStream", chat([{"role": "user", "content": MARK}])),
            ("LoadModel", pb.ModelOptions(Model=MARK)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                _call(worker, rpc, raw_with_invalid_utf8(message, MARK))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert worker.stub.Health(pb.HealthMessage(), timeout=10).message == b"OK"


def test_after_the_table_both_workers_still_serve(loaded, fresh, tiny_model_dir):
    """Runs after the table (module order)."""
    assert loaded.proc.poll() is None and fresh.proc.poll() is None
    assert loaded.stub.Predict(greedy(Tokens=5), timeout=120).tokens == 5
    chunks = list(loaded.stub.PredictStream(greedy(Tokens=5), timeout=120))
    assert chunks[-1].tokens == 5
    reply = loaded.stub.Predict(chat(Metadata={"enable_thinking": "false"}), timeout=120)
    assert reply.tokens > 0
    assert state(loaded) == pb.StatusResponse.READY
    assert fresh.stub.Status(pb.HealthMessage(), timeout=10).state in (
        pb.StatusResponse.UNINITIALIZED,
        pb.StatusResponse.ERROR,  # the last LoadModel of the table failed
    )
    load(fresh, tiny_model_dir)
    assert fresh.stub.Predict(greedy(Tokens=3), timeout=120).tokens == 3


# ---- ModelIdentity --------------------------------------------------------------------


def test_model_identity_mismatch_is_failed_precondition_naming_both(loaded, tiny_model_dir):
    served = str(tiny_model_dir)
    calls = {
        "Predict": lambda r: loaded.stub.Predict(r, timeout=60),
        "PredictStream": lambda r: list(loaded.stub.PredictStream(r, timeout=60)),
        "TokenizeString": lambda r: loaded.stub.TokenizeString(r, timeout=60),
        "Embedding": lambda r: loaded.stub.Embedding(r, timeout=60),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            call(greedy(ModelIdentity="other-model/v2"))
        assert err.value.code() == FP, (name, err.value.details())
        assert "other-model/v2" in err.value.details() and served in err.value.details(), name


def test_model_identity_equal_or_empty_is_served(loaded, tiny_model_dir):
    assert (
        loaded.stub.Predict(greedy(Tokens=2, ModelIdentity=str(tiny_model_dir)), timeout=60).tokens
        == 2
    )
    assert loaded.stub.Predict(greedy(Tokens=2, ModelIdentity=""), timeout=60).tokens == 2
    assert loaded.stub.TokenizeString(
        pb.PredictOptions(Prompt="hi", ModelIdentity=str(tiny_model_dir)), timeout=60
    ).tokens


# ---- LoadModel with bad options on a serving worker -------------------------------------


def test_a_rejected_load_leaves_the_serving_model_in_place(loaded, tiny_model_dir):
    """A LoadModel rejected by validation does not unload the serving model."""
    result = loaded.stub.LoadModel(
        tiny_load_options(tiny_model_dir, "--max-num-seqz:8"), timeout=300
    )
    assert not result.success and "did you mean" in result.message
    assert loaded.stub.Predict(greedy(Tokens=2), timeout=60).tokens == 2
