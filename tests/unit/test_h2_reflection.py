"""Server reflection (grpcurl list / describe) on both transports, and the
client-streaming and bidirectional calls h2grpc serves it with.

The worker's own server (`backend.server.make_server`, no model), in this
process; grpc's own reflection client (ProtoReflectionDescriptorDatabase)
for v1alpha, and the same messages on the v1 path, which grpcurl asks first.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2 as rpb
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from backend import h2grpc, reflection
from backend.config import parse_config
from backend.h2grpc import frames
from backend.server import make_server
from backend.servicer import BackendServicer
from tests.unit.test_h2grpc import RawClient

pytestmark = pytest.mark.timeout(60)

SERVICES = {
    "backend.Backend",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
}


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(params=["grpcio", "h2"])
def addr(request) -> Iterator[str]:
    config = parse_config(["--addr", "127.0.0.1:0", "--transport", request.param], env={})
    loop = _Loop()

    async def start() -> tuple[Any, int]:
        server = make_server(config, BackendServicer(config))
        return server, await server.listen()

    server, port = loop.run(start())
    try:
        yield f"127.0.0.1:{port}"
    finally:
        loop.run(server.stop(0))
        loop.close()


def test_grpcs_reflection_client_lists_and_describes_the_services(addr: str) -> None:
    with grpc.insecure_channel(addr) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert set(db.get_services()) == SERVICES
        pool = DescriptorPool(db)
        backend = pool.FindServiceByName("backend.Backend")
        predict = backend.FindMethodByName("PredictStream")
        assert predict.input_type.full_name == "backend.PredictOptions"
        assert predict.server_streaming and not predict.client_streaming
        assert {m.name for m in backend.methods} >= {"Health", "Predict", "LoadModel"}
        v1 = pool.FindServiceByName("grpc.reflection.v1.ServerReflection")
        info = v1.FindMethodByName("ServerReflectionInfo")
        assert info.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"


def test_the_v1_service_answers_several_requests_on_one_stream(addr: str) -> None:
    """grpcurl's first choice: grpc.reflection.v1, one bidirectional stream
    for all its questions, answered in order."""
    with grpc.insecure_channel(addr) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=rpb.ServerReflectionRequest.SerializeToString,
            response_deserializer=rpb.ServerReflectionResponse.FromString,
        )
        requests = [
            rpb.ServerReflectionRequest(list_services=""),
            rpb.ServerReflectionRequest(file_containing_symbol="backend.Backend"),
            rpb.ServerReflectionRequest(file_containing_symbol="no.such.Thing"),
        ]
        replies = list(call(iter(requests), timeout=10))
    assert [r.WhichOneof("message_response") for r in replies] == [
        "list_services_response",
        "file_descriptor_response",
        "error_response",
    ]
    assert {s.name for s in replies[0].list_services_response.service} == SERVICES
    assert replies[2].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


# ---- the request streams of h2grpc ---------------------------------------------


@pytest.fixture
def h2_reflection() -> Iterator[int]:
    """Reflection alone behind h2grpc, with a 1,000-byte message limit."""
    loop = _Loop()
    server = h2grpc.Server(reflection.h2_methods(("backend.Backend",)), max_message_bytes=1000)
    port = loop.run(server.listen("127.0.0.1:0"))
    try:
        yield port
    finally:
        loop.run(server.stop(0))
        loop.close()


def _message(request: rpb.ServerReflectionRequest) -> bytes:
    data = request.SerializeToString()
    return struct.pack(">BI", 0, len(data)) + data


PATH = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def test_a_request_stream_is_answered_message_by_message(h2_reflection: int) -> None:
    """Each request gets its reply before the next is sent: the handler runs
    while the request stream is open, and its end ends the call with OK."""
    with RawClient(h2_reflection) as raw:
        raw.open(1, PATH)
        for _ in range(3):
            raw.send(frames.DATA, 0, 1, _message(rpb.ServerReflectionRequest(list_services="")))
            _kind, _flags, _sid, payload = raw.read_frame(
                lambda f: f[0] == frames.DATA and f[2] == 1
            )
            reply = rpb.ServerReflectionResponse.FromString(payload[5:])
            assert reply.HasField("list_services_response")
        raw.send(frames.DATA, frames.END_STREAM, 1)
        assert ("grpc-status", "0") in raw.read_until_end(1)


def test_a_request_stream_is_bounded_and_must_end_on_a_message(h2_reflection: int) -> None:
    with RawClient(h2_reflection) as raw:
        raw.open(1, PATH)  # a message declared beyond the 1,000-byte limit
        raw.send(frames.DATA, 0, 1, struct.pack(">BI", 0, 5000) + bytes(100))
        headers = dict(raw.read_until_end(1))
        assert headers["grpc-status"] == "8", headers
        assert "larger than max (5000 vs. 1000)" in headers["grpc-message"], headers
        raw.open(3, PATH)  # half a message, then the end
        raw.send(frames.DATA, frames.END_STREAM, 3, struct.pack(">BI", 0, 50) + bytes(10))
        headers = dict(raw.read_until_end(3))
        assert headers["grpc-status"] == "13", headers
        assert "ends inside a message" in headers["grpc-message"], headers
