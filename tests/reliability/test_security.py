"""Security defaults: bearer-token auth on every RPC, loopback bind, no remote code
unless asked, and no request content in the log.

One worker, started with LOCALAI_GRPC_AUTH_TOKEN.
"""

from __future__ import annotations

import json
import re
import secrets
import time

import grpc
import pytest

from backend.config import parse_config
from backend.gen import backend_pb2 as pb
from backend.gen import backend_pb2_grpc
from tests.conftest import Worker, retire, tiny_load_options
from tests.reliability.helpers import greedy, log_text

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

TOKEN = secrets.token_hex(16)
GOOD = (("authorization", f"Bearer {TOKEN}"),)


class AuthWorker(Worker):
    """Worker whose readiness probe carries the token (without it Health is refused)."""

    health_metadata = GOOD


@pytest.fixture(scope="module")
def worker():
    w = AuthWorker(env={"LOCALAI_GRPC_AUTH_TOKEN": TOKEN})
    try:
        yield w
    finally:
        retire(w)


@pytest.fixture(scope="module")
def loaded(worker, tiny_model_dir):
    result = worker.stub.LoadModel(tiny_load_options(tiny_model_dir), metadata=GOOD, timeout=600)
    assert result.success, result.message
    return worker


def _calls(stub: backend_pb2_grpc.BackendStub, model_dir) -> dict:
    return {
        "Health": lambda md: stub.Health(pb.HealthMessage(), metadata=md, timeout=10),
        "Status": lambda md: stub.Status(pb.HealthMessage(), metadata=md, timeout=10),
        "LoadModel": lambda md: stub.LoadModel(
            tiny_load_options(model_dir), metadata=md, timeout=60
        ),
        "Predict": lambda md: stub.Predict(greedy(Tokens=2), metadata=md, timeout=30),
        "PredictStream": lambda md: list(
            stub.PredictStream(greedy(Tokens=2), metadata=md, timeout=30)
        ),
        "TokenizeString": lambda md: stub.TokenizeString(
            pb.PredictOptions(Prompt="x"), metadata=md, timeout=10
        ),
        "Detokenize": lambda md: stub.Detokenize(
            pb.DetokenizeRequest(tokens=[1]), metadata=md, timeout=10
        ),
        "Free": lambda md: stub.Free(pb.HealthMessage(), metadata=md, timeout=30),
    }


BAD_METADATA = {
    "none": None,
    "wrong-token": (("authorization", "Bearer not-the-token"),),
    "token-without-bearer": (("authorization", TOKEN),),
    "lowercase-bearer": (("authorization", f"bearer {TOKEN}"),),
    "token-prefix": (("authorization", f"Bearer {TOKEN[:-1]}"),),
    "token-with-suffix": (("authorization", f"Bearer {TOKEN}x"),),
    "other-header": (("x-authorization", f"Bearer {TOKEN}"),),
}


@pytest.mark.parametrize("metadata", BAD_METADATA.values(), ids=BAD_METADATA.keys())
def test_every_rpc_without_the_right_token_is_unauthenticated(worker, tiny_model_dir, metadata):
    # The module's worker has a model or not, depending on which tests ran
    # before (a shuffled run found this test assuming none).
    before = worker.stub.Status(pb.HealthMessage(), metadata=GOOD, timeout=10).state
    core = worker.engine_core_pid()
    for name, call in _calls(worker.stub, tiny_model_dir).items():
        with pytest.raises(grpc.RpcError) as err:
            call(metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, err.value.details())
    # Nothing ran: the refused LoadModel loaded or replaced nothing, the refused
    # Free unloaded nothing.
    status = worker.stub.Status(pb.HealthMessage(), metadata=GOOD, timeout=10)
    assert status.state == before
    assert worker.engine_core_pid() == core


def test_unknown_methods_are_refused_too(worker):
    call = worker.channel.unary_unary("/backend.Backend/NoSuchMethod")
    with pytest.raises(grpc.RpcError) as err:
        call(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_right_token_works_for_unary_and_streaming(loaded):
    stub = loaded.stub
    assert stub.Health(pb.HealthMessage(), metadata=GOOD, timeout=10).message == b"OK"
    assert stub.Predict(greedy(Tokens=3), metadata=GOOD, timeout=60).tokens == 3
    chunks = list(stub.PredictStream(greedy(Tokens=3), metadata=GOOD, timeout=60))
    assert chunks[-1].tokens == 3
    assert stub.TokenizeString(pb.PredictOptions(Prompt="hi"), metadata=GOOD, timeout=10).tokens


def test_default_bind_is_loopback():
    assert parse_config([], env={}).addr.startswith("127.0.0.1:")
    assert parse_config(["--addr=0.0.0.0:1"], env={}).addr == "0.0.0.0:1", "explicit wins"


# ---- the log ------------------------------------------------------------------------


def _secret() -> str:
    return f"SECRET-{secrets.token_hex(8)}"


def test_request_content_is_not_logged_at_info(loaded):
    stub = loaded.stub
    prompt, message, streamed, tokenized, tool = (_secret() for _ in range(5))
    stub.Predict(greedy(Prompt=f"My password is {prompt}", Tokens=3), metadata=GOOD, timeout=60)
    chat = pb.PredictOptions(
        UseTokenizerTemplate=True,
        Messages=[
            pb.Message(role="system", content="be brief"),
            pb.Message(role="user", content=f"my card is {message}"),
        ],
        Tools=json.dumps([{"type": "function", "function": {"name": "f", "description": tool}}]),
        Tokens=3,
    )
    stub.Predict(chat, metadata=GOOD, timeout=60)
    chat.Messages[1].content = f"my card is {streamed}"
    list(stub.PredictStream(chat, metadata=GOOD, timeout=60))
    stub.TokenizeString(pb.PredictOptions(Prompt=tokenized), metadata=GOOD, timeout=10)
    time.sleep(0.5)
    log = log_text(loaded)
    for secret in (prompt, message, streamed, tokenized, tool):
        assert secret not in log


def test_rejected_request_content_is_not_logged_at_info(loaded):
    stub = loaded.stub
    role, choice, flag = (_secret() for _ in range(3))
    for req in (
        pb.PredictOptions(UseTokenizerTemplate=True, Messages=[pb.Message(role=role, content="x")]),
        pb.PredictOptions(
            UseTokenizerTemplate=True,
            Messages=[pb.Message(role="user", content="x")],
            Tools='[{"type": "function", "function": {"name": "f"}}]',
            ToolChoice=choice,
        ),
        pb.PredictOptions(
            UseTokenizerTemplate=True,
            Messages=[pb.Message(role="user", content="x")],
            Metadata={"enable_thinking": flag},
        ),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(req, metadata=GOOD, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(0.5)
    log = log_text(loaded)
    leaked = [s for s in (role, choice, flag) if s in log]
    assert not leaked, [line for line in log.splitlines() if any(s in line for s in leaked)]


# ---- trust_remote_code ----------------------------------------------------------------


def test_trust_remote_code_is_off_unless_asked_and_logged_when_on(loaded, tiny_model_dir):
    """Runs last: reloads the model with TrustRemoteCode."""
    log = log_text(loaded)
    # vLLM logs its resolved config when the engine starts.
    assert re.search(r"trust_remote_code=False", log), "the first load ran without remote code"
    assert "trust_remote_code is ON" not in log
    result = loaded.stub.LoadModel(
        tiny_load_options(tiny_model_dir, TrustRemoteCode=True), metadata=GOOD, timeout=600
    )
    assert result.success, result.message
    log = log_text(loaded)
    assert "trust_remote_code is ON" in log
    assert "trust_remote_code=True" in log
    line = next(x for x in log.splitlines() if "trust_remote_code is ON" in x)
    assert " WARNING " in line, line


def test_standard_health_needs_no_token_reflection_does(worker):
    """Kubernetes gRPC probes cannot send a token: grpc.health.v1 is exempt."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    reply = health_pb2_grpc.HealthStub(worker.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=10
    )
    assert reply.status in (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    with pytest.raises(grpc.RpcError) as err:
        list(ProtoReflectionDescriptorDatabase(worker.channel).get_services())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
