"""A small servicer on the Backend service behind backend/h2grpc/, on its
own event loop thread: the stand-in the transport's unit tests talk to (no engine)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc

from backend import h2grpc
from backend.gen import backend_pb2 as pb


class Servicer:
    """Predict echoes Prompt; PredictStream sends `Tokens` replies of
    `Batch` bytes each, `TopP` ms apart; TokenizeString aborts or raises
    as its Prompt says."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.started = threading.Event()
        self.health_calls = 0

    async def Health(self, request: pb.HealthMessage, context: Any) -> pb.Reply:
        self.health_calls += 1
        return pb.Reply(message=b"OK")

    async def Predict(self, request: pb.PredictOptions, context: Any) -> pb.Reply:
        if request.TopP:
            try:
                self.started.set()
                await asyncio.sleep(request.TopP / 1000)
            except asyncio.CancelledError:
                self.cancelled.append(request.CorrelationId)
                raise
        meta = dict(context.invocation_metadata())
        return pb.Reply(message=request.Prompt.encode(), tokens=len(meta.get("x-echo", "")))

    async def PredictStream(self, request: pb.PredictOptions, context: Any) -> None:
        try:
            for i in range(request.Tokens):
                if request.TopP:
                    await asyncio.sleep(request.TopP / 1000)
                self.started.set()
                body = bytes([65 + i % 26]) * (request.Batch or 1)
                await context.write(pb.Reply(message=body, tokens=i))
        except asyncio.CancelledError:
            self.cancelled.append(request.CorrelationId)
            raise

    async def TokenizeString(self, request: pb.PredictOptions, context: Any) -> Any:
        if request.Prompt == "raise":
            raise RuntimeError("boom")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.Prompt)


class Running:
    def __init__(self, **options: Any) -> None:
        self.servicer = Servicer()
        self.loop = asyncio.new_event_loop()
        service = pb.DESCRIPTOR.services_by_name["Backend"]
        self.server = h2grpc.Server(h2grpc.methods_of(self.servicer, service), **options)
        self.port = 0
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.port = self.loop.run_until_complete(self.server.listen("127.0.0.1:0"))
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)
        self.addr = f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 0.0) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(30)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def channel(self, *options: tuple[str, Any]) -> grpc.Channel:
        return grpc.insecure_channel(self.addr, options=list(options))
