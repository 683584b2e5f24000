"""A handler's own `context.abort` status reaches the client unchanged, on both
transports: servicer._unary lets grpc.aio.AbortError through (every other
exception is mapped to a status), and h2grpc's AbortError is one.

The worker's own servicer and server (`make_server`), in this process; the
handler that aborts is a subclass's, since no Backend method aborts by itself
inside `_unary` today.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from backend.config import parse_config
from backend.gen import backend_pb2 as pb
from backend.gen import backend_pb2_grpc
from backend.server import make_server
from backend.servicer import BackendServicer, _unary

pytestmark = pytest.mark.timeout(60)


class Aborting(BackendServicer):
    @_unary
    async def TokenizeString(self, request: pb.PredictOptions, context: Any) -> Any:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"own status: {request.Prompt}")


@pytest.fixture(params=["grpcio", "h2"])
def addr(request) -> Iterator[str]:
    config = parse_config(["--addr", "127.0.0.1:0", "--transport", request.param], env={})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[Any, int]:
        server = make_server(config, Aborting(config))
        return server, await server.listen()

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_a_handlers_own_abort_reaches_the_client_unchanged(addr: str) -> None:
    with grpc.insecure_channel(addr) as channel:
        stub = backend_pb2_grpc.BackendStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.TokenizeString(pb.PredictOptions(Prompt="kept"), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "own status: kept"
