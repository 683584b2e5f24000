"""grpc.health.v1.Health and server reflection on a real worker.

SERVING only while a model is loaded (and its engine alive): NOT_SERVING
before LoadModel and after Free; Watch streams the transitions. Reflection
(grpcurl) lists and describes the services on both transports.
"""

from __future__ import annotations

import queue
import threading

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2 as hpb
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from backend.gen import backend_pb2 as pb
from tests.reliability.helpers import load

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.timeout(600)]

SERVING = hpb.HealthCheckResponse.SERVING
NOT_SERVING = hpb.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = hpb.HealthCheckResponse.SERVICE_UNKNOWN


class Watcher:
    """A Watch stream read on its own thread into a queue."""

    def __init__(self, stub: health_pb2_grpc.HealthStub, service: str = "") -> None:
        self.call = stub.Watch(hpb.HealthCheckRequest(service=service), timeout=600)
        self.seen: queue.Queue[int] = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for reply in self.call:
                self.seen.put(reply.status)
        except grpc.RpcError:
            pass

    def next(self, timeout: float = 10) -> int:
        return self.seen.get(timeout=timeout)


def _check(stub: health_pb2_grpc.HealthStub, service: str = "") -> int:
    return stub.Check(hpb.HealthCheckRequest(service=service), timeout=10).status


@pytest.mark.parametrize("transport", [pytest.param("grpcio", marks=pytest.mark.long), "h2"])
def test_health_follows_the_model(workers, transport, tiny_model_dir):
    env = {"BACKEND_TRANSPORT": transport} if transport != "h2" else None
    with workers.use(env=env) as worker:
        stub = health_pb2_grpc.HealthStub(worker.channel)
        assert _check(stub) == NOT_SERVING
        assert _check(stub, "backend.Backend") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            _check(stub, "no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        unknown = Watcher(stub, "no.such.Service")
        assert unknown.next() == SERVICE_UNKNOWN

        watch = Watcher(stub)
        assert watch.next() == NOT_SERVING
        load(worker, tiny_model_dir)
        assert _check(stub) == SERVING
        assert watch.next() == SERVING
        assert worker.stub.Free(pb.HealthMessage(), timeout=120).success
        assert _check(stub) == NOT_SERVING
        assert watch.next() == NOT_SERVING
        watch.call.cancel()
        unknown.call.cancel()


@pytest.mark.parametrize("transport", ["grpcio", "h2"])
def test_reflection_lists_and_describes_the_services(workers, transport):
    """grpcurl list / describe: grpc's own reflection client (v1alpha) against
    a real worker; v1, which grpcurl asks first, is listed too."""
    env = {"BACKEND_TRANSPORT": transport} if transport != "h2" else None  # h2: the default
    with workers.use(env=env) as worker:
        assert f"transport {transport}" in worker.log_text()
        db = ProtoReflectionDescriptorDatabase(worker.channel)
        services = set(db.get_services())
        assert {
            "backend.Backend",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "grpc.reflection.v1.ServerReflection",
        } <= services, services
        pool = DescriptorPool(db)
        health = pool.FindServiceByName("backend.Backend").FindMethodByName("Health")
        assert health.input_type.full_name == "backend.HealthMessage"
