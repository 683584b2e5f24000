"""Server reflection (`grpcurl list` / `describe`), v1alpha and v1, on both
transports, with grpcio-reflection's own servicer and descriptor logic.

grpcio-reflection ships only `grpc.reflection.v1alpha`; `grpc.reflection.v1`
(what grpcurl asks first) is the same protocol, message for message and field
for field, under another package. So v1 is served by the same servicer with
the v1alpha messages (the bytes on the wire are identical), and the v1
service's descriptor, the v1alpha file renamed, is added to the default pool
so that reflection can describe itself under both names.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

V1ALPHA = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
V1 = "grpc.reflection.v1.ServerReflection"
METHOD = "ServerReflectionInfo"
PATHS = (f"/{V1ALPHA}/{METHOD}", f"/{V1}/{METHOD}")


def _register_v1() -> None:
    pool = descriptor_pool.Default()
    name = "grpc/reflection/v1/reflection.proto"
    try:
        pool.FindFileByName(name)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name = name
    proto.package = "grpc.reflection.v1"
    proto.ClearField("options")  # v1alpha's java_package and the like
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = field.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.AddSerializedFile(proto.SerializeToString())


_register_v1()


def servicer(services: tuple[str, ...]) -> Any:
    """grpcio-reflection's asyncio servicer, listing `services` and both
    reflection services."""
    return reflection.aio.ReflectionServicer((*services, V1ALPHA, V1))


def grpcio_handlers(services: tuple[str, ...]) -> tuple[grpc.GenericRpcHandler, ...]:
    """Both reflection services for grpc.aio."""
    handler = grpc.stream_stream_rpc_method_handler(
        servicer(services).ServerReflectionInfo,
        request_deserializer=v1alpha.ServerReflectionRequest.FromString,
        response_serializer=v1alpha.ServerReflectionResponse.SerializeToString,
    )
    return tuple(
        grpc.method_handlers_generic_handler(name, {METHOD: handler}) for name in (V1ALPHA, V1)
    )


def h2_methods(services: tuple[str, ...]) -> dict[str, Any]:
    """Both reflection services for backend/h2grpc (path -> h2grpc.Method)."""
    from backend import h2grpc

    table = h2grpc.methods_of(
        servicer(services), v1alpha.DESCRIPTOR.services_by_name["ServerReflection"]
    )
    (method,) = table.values()
    return {path: method for path in PATHS}
