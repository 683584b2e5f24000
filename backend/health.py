"""The standard gRPC health service (`grpc.health.v1.Health`), for load
balancers and Kubernetes probes.

SERVING only while a model is loaded and its engine is alive; NOT_SERVING
otherwise (no model yet, after Free, after an engine death). The state is read
from a callable (the servicer owns it), so nothing has to remember to update
it. The service name is "" (the whole server) or "backend.Backend"; any other
name is NOT_FOUND for Check and SERVICE_UNKNOWN for Watch, as the protocol says.
Runs on both transports: the handlers only use `context.write/abort`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICES = ("", "backend.Backend")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthService(health_pb2_grpc.HealthServicer):
    def __init__(self, serving: Callable[[], bool], poll_interval: float = 0.5) -> None:
        self._serving = serving
        self._poll = poll_interval
        self.stopping = False

    def status(self, service: str) -> Any:
        if service not in SERVICES:
            return SERVICE_UNKNOWN
        return SERVING if self._serving() and not self.stopping else NOT_SERVING

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status == SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        """The current status at once, then every change (polled: a load, a
        Free and an engine death all show within `poll_interval`)."""
        last = None
        while True:
            status = self.status(request.service)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            await asyncio.sleep(self._poll)
