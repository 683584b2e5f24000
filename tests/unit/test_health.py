"""backend/health.py: grpc.health.v1 status from a callable, Check and Watch."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2 as hpb

from backend.health import HealthService

SERVING = hpb.HealthCheckResponse.SERVING
NOT_SERVING = hpb.HealthCheckResponse.NOT_SERVING


class Aborted(Exception):
    pass


class Context:
    def __init__(self) -> None:
        self.written: list[int] = []

    async def write(self, message: Any) -> None:
        self.written.append(message.status)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Aborted(code)


def test_check_follows_the_callable_and_refuses_unknown_services() -> None:
    state = {"up": False}
    health = HealthService(lambda: state["up"])

    async def run() -> None:
        check = health.Check
        assert (await check(hpb.HealthCheckRequest(), Context())).status == NOT_SERVING
        state["up"] = True
        assert (await check(hpb.HealthCheckRequest(), Context())).status == SERVING
        req = hpb.HealthCheckRequest(service="backend.Backend")
        assert (await check(req, Context())).status == SERVING
        with pytest.raises(Aborted) as err:
            await check(hpb.HealthCheckRequest(service="other"), Context())
        assert err.value.args[0] == grpc.StatusCode.NOT_FOUND
        health.stopping = True  # shutting down: not serving, whatever the model
        assert (await check(hpb.HealthCheckRequest(), Context())).status == NOT_SERVING

    asyncio.run(run())


def test_watch_sends_the_current_status_then_each_change_once() -> None:
    state = {"up": False}
    health = HealthService(lambda: state["up"], poll_interval=0.01)
    ctx = Context()

    async def sent(n: int) -> None:
        # Each change waits for the message before it (polled, not timed: a
        # loaded machine delays the watch without changing what it sends).
        for _ in range(1000):
            if len(ctx.written) >= n:
                return
            await asyncio.sleep(0.01)

    async def run() -> None:
        task = asyncio.create_task(health.Watch(hpb.HealthCheckRequest(), ctx))
        await sent(1)
        state["up"] = True
        await sent(2)
        state["up"] = False
        await sent(3)
        await asyncio.sleep(0.05)  # five more polls: nothing is sent twice
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert ctx.written == [NOT_SERVING, SERVING, NOT_SERVING]


def test_health_needs_no_token_on_h2_where_everything_else_does() -> None:
    from grpc_health.v1 import health_pb2_grpc

    from backend import h2grpc
    from backend.gen import backend_pb2 as pb
    from backend.gen import backend_pb2_grpc
    from backend.server import AUTH_EXEMPT
    from tests.h2server import Running

    server = Running(auth_token="secret", auth_exempt=AUTH_EXEMPT)
    # Running serves the Backend test servicer; add the health service.
    health = HealthService(lambda: True)
    server.server.methods.update(
        h2grpc.methods_of(health, hpb.DESCRIPTOR.services_by_name["Health"])
    )
    try:
        channel = server.channel()
        reply = health_pb2_grpc.HealthStub(channel).Check(hpb.HealthCheckRequest(), timeout=10)
        assert reply.status == SERVING
        with pytest.raises(grpc.RpcError) as err:
            backend_pb2_grpc.BackendStub(channel).Health(pb.HealthMessage(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        channel.close()
    finally:
        server.close()
