"""BackendServicer: one short method per RPC — convert, call the engine, convert back.

Errors are raised, never turned into status codes here: `_unary` hands every
exception to `errors.to_status`, which gives the status the RPC is aborted with.
Cancellation (client gone, deadline) arrives as `asyncio.CancelledError` in
the handler task; it is never caught, so it reaches vLLM's `generate`, which
aborts the engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import text_format

from backend import generation, pooling
from backend import status as status_mod
from backend.config import ServerConfig
from backend.errors import (
    FailedPrecondition,
    NotLoaded,
    Overloaded,
    Unavailable,
    to_status,
)
from backend.gen import backend_pb2 as pb
from backend.gen import backend_pb2_grpc
from backend.metrics import WorkerMetrics
from backend.model import LoadedModel
from backend.model_metadata import model_metadata
from backend.request import GenerationRequest
from backend.scoring import score

log = logging.getLogger(__name__)

T = TypeVar("T")


# What a request still running when its engine is stopped is told. Its output
# is incomplete, so it ends UNAVAILABLE (the gateway may retry it elsewhere),
# never with a final Reply that looks complete.
CUT_BY_FREE = "the model was unloaded (Free) while this request ran: its output is incomplete"
CUT_BY_LOAD = "the model was replaced (LoadModel) while this request ran: its output is incomplete"
CUT_BY_SHUTDOWN = (
    "the worker is shutting down and its grace period ended while this request ran: "
    "its output is incomplete"
)


def _unary(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(method)
    async def wrapper(self: BackendServicer, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            result = await method(self, request, context)
        except asyncio.CancelledError:
            self.counters.rpc_done(method.__name__, "CANCELLED")
            raise
        except grpc.aio.AbortError:
            raise  # context.abort already ran (in the handler): its status stands
        except Exception as exc:  # every failure becomes a status, in one place
            await self._abort(context, exc, method.__name__)
            raise  # unreachable: context.abort raises
        self.counters.rpc_done(method.__name__, "OK")
        return result

    return wrapper


def freeze_heap() -> None:
    """Move every object alive now out of the collector's reach, as vLLM's own
    server does after start-up (`vllm.utils.gc_utils.freeze_gc_heap`). Importing
    vLLM and torch leaves ~600k objects; each full collection would scan them
    all and stop every call for 0.1-0.5 s (measured: a burst of 400 new
    connections triggered one, and Health waited 0.45 s on a quiet machine, over
    3 s on a loaded one). Called at start-up, after a load and after a release.
    """
    gc.collect()
    gc.freeze()


class BackendServicer(backend_pb2_grpc.BackendServicer):
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.model: LoadedModel | None = None
        self.load_error: str | None = None
        self._load_lock = asyncio.Lock()
        self._loading = False
        self._active = 0
        self._idle = asyncio.Event()  # set whenever no request is running
        self._idle.set()
        # Seconds Free / a replacing LoadModel wait for running requests to end
        # before the engine is stopped and the rest are cut.
        self.drain_seconds = config.drain_seconds
        self._ids = itertools.count(1)
        self.counters = WorkerMetrics(self._model_name, lambda: self._active)

    # ---- plumbing -----------------------------------------------------------

    def _model_name(self) -> str:
        """The metrics label: vLLM's served model name, as on its own `vllm:*` metrics."""
        model = self.model
        return str(model.engine.model_config.served_model_name) if model is not None else ""

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception, rpc: str) -> None:
        code, message = to_status(exc)
        self.counters.rpc_done(rpc, code.name)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", rpc)
        elif self.config.debug_requests:
            log.info("%s: %s: %s", rpc, code.name, message)
        else:
            # The message may quote the request (a role, a tool name, a
            # grammar): request content stays out of the INFO log.
            log.info("%s: %s", rpc, code.name)
            log.debug("%s: %s: %s", rpc, code.name, message)
        await context.abort(code, message)

    async def watch_engine(self, interval: float, on_death: Callable[[], None]) -> None:
        """Notice an engine death even when no request is running.

        In-flight requests learn of it from vLLM at once (EngineDeadError);
        this makes Health/Status and the optional exit independent of traffic.
        """
        while True:
            await asyncio.sleep(interval)
            model = self.model
            if model is not None and model.engine.errored and self._report_death(model):
                on_death()

    def _report_death(self, model: LoadedModel) -> bool:
        """Log an engine death once — one ERROR line naming the cause (vLLM's own
        traceback for it says nothing and is dropped: backend/engine_death.py).
        False if it was reported already."""
        if model.engine.death_reported:
            return False
        model.engine.death_reported = True
        then = (
            "exiting (exit_on_engine_death) so the gateway restarts the worker"
            if self.config.exit_on_engine_death
            else "Health answers UNAVAILABLE until LoadModel"
        )
        log.error("the vLLM engine died: %s; %s", model.engine.death_cause(), then)
        return True

    def _require_model(self, identity: str = "") -> LoadedModel:
        model = self.model
        if model is None:
            if self._loading:
                raise Unavailable("the model is still loading: retry when LoadModel returns")
            raise NotLoaded()
        if model.engine.errored:
            raise Unavailable("the vLLM engine died: call LoadModel to restart it")
        if identity and identity != model.identity:
            raise FailedPrecondition(
                f"this worker serves model {model.identity!r}, the request names {identity!r}"
            )
        return model

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """Count a request as running, or refuse it at once when the
        max_concurrent_requests cap is reached (no unbounded queueing)."""
        cap = self.config.max_concurrent_requests
        if cap and self._active >= cap:
            raise Overloaded(
                f"{self._active} requests already running "
                f"(max_concurrent_requests={cap}): retry later"
            )
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    def _request_id(self, correlation_id: str, describe: Callable[[], str]) -> str:
        rid = f"{correlation_id or 'req'}-{next(self._ids)}"
        if self.config.debug_requests:
            # Only with --debug-requests: prompts may be private.
            log.info("request %s: %s", rid, describe())
        return rid

    # ---- lifecycle ----------------------------------------------------------

    @_unary
    async def Health(
        self, request: pb.HealthMessage, context: grpc.aio.ServicerContext
    ) -> pb.Reply:
        model = self.model
        if model is not None and model.engine.errored:
            raise Unavailable("the vLLM engine died")
        return pb.Reply(message=b"OK")

    async def LoadModel(
        self, request: pb.ModelOptions, context: grpc.aio.ServicerContext
    ) -> pb.Result:
        async with self._load_lock:
            self._loading = True
            try:
                plan, template = await LoadedModel.validate(request)
                await self._release(CUT_BY_LOAD, f"LoadModel (replacing it with {plan.model})")
                self.model = await LoadedModel.load(request, plan, template)
                self.load_error = None
                freeze_heap()  # the model's objects too; undone on release
                return pb.Result(success=True, message=self.model.summary())
            except Exception as exc:  # LoadModel reports failure, it never raises
                code, message = to_status(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("LoadModel failed")
                self.load_error = message
                log.error("LoadModel failed: %s", message)
                return pb.Result(success=False, message=f"failed to load model: {message}")
            finally:
                self._loading = False

    async def Free(self, request: pb.HealthMessage, context: grpc.aio.ServicerContext) -> pb.Result:
        async with self._load_lock:
            freed = self.model is not None
            await self._release(CUT_BY_FREE, "Free")
            return pb.Result(
                success=True, message="model freed" if freed else "no model was loaded"
            )

    async def close(self, why: str = "shutdown") -> None:
        """Server shutdown, once the grace period is over: stop the engine so no
        engine process outlives us; requests still running end UNAVAILABLE.
        `why` says what asked for it (SIGTERM, ...), for the log."""
        async with self._load_lock:
            # The grace period (BACKEND_GRACE_SECONDS) was the server's drain.
            await self._release(CUT_BY_SHUTDOWN, why, drain=0.0, more_time="BACKEND_GRACE_SECONDS")

    @property
    def running(self) -> int:
        """Requests running now (admitted and not yet ended)."""
        return self._active

    async def drain(self, seconds: float) -> None:
        """Wait up to `seconds` for the running requests to end."""
        if self._active:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._idle.wait()

    async def _release(
        self,
        reason: str,
        event: str,
        drain: float | None = None,
        more_time: str = "--drain-seconds",
    ) -> None:
        """Unload the model: new requests are refused at once, running ones
        get `drain_seconds` to end, then the engine stops and what still runs
        ends with UNAVAILABLE `reason`. One INFO line says what was stopped,
        why (`event`) and how long it took, and which setting (`more_time`)
        would have let cut requests finish."""
        model, self.model = self.model, None
        if model is None:
            return
        if model.engine.errored and model.engine.closing is None:
            self._report_death(model)  # replaced before the watcher's next look
        started = time.monotonic()
        wait = self.drain_seconds if drain is None else drain
        if wait > 0 and self._active:
            await self.drain(wait)
        waited = time.monotonic() - started
        cut = self._active
        model.engine.closing = reason
        gc.unfreeze()  # the model's objects must be collectable again
        await model.close()  # ends with a full collection: the model is gone
        freeze_heap()
        took = time.monotonic() - started - waited
        details = [f"stopped the engine of {model.identity} in {took:.1f}s"]
        if wait > 0:
            details.append(f"after waiting {waited:.1f}s of {wait:.1f}s for running requests")
        if cut:
            details.append(f"{cut} running request(s) cut ({more_time} lets them finish)")
        log.info("%s: %s", event, "; ".join(details))

    async def Status(
        self, request: pb.HealthMessage, context: grpc.aio.ServicerContext
    ) -> pb.StatusResponse:
        model = self.model
        if model is not None and model.engine.errored:
            state = pb.StatusResponse.ERROR
        elif model is None:
            state = pb.StatusResponse.ERROR if self.load_error else pb.StatusResponse.UNINITIALIZED
        elif self._active or model.engine.num_unfinished:
            state = pb.StatusResponse.BUSY
        else:
            state = pb.StatusResponse.READY
        total, breakdown = status_mod.memory_usage()
        return pb.StatusResponse(
            state=state, memory=pb.MemoryUsageData(total=total, breakdown=breakdown)
        )

    # ---- generation ---------------------------------------------------------

    @_unary
    async def Predict(
        self, request: pb.PredictOptions, context: grpc.aio.ServicerContext
    ) -> pb.Reply:
        return await self._generate(GenerationRequest.from_proto(request, stream=False), None)

    @_unary
    async def PredictStream(
        self, request: pb.PredictOptions, context: grpc.aio.ServicerContext
    ) -> None:
        # A coroutine handler writing with context.write, not an async
        # generator: each streamed message then crosses one await instead of
        # three generator layers (ours, the error wrapper, grpc's).
        req = GenerationRequest.from_proto(request, stream=True)
        await context.write(await self._generate(req, context.write))

    async def _generate(
        self, req: GenerationRequest, send: Callable[[pb.Reply], Awaitable[None]] | None
    ) -> pb.Reply:
        model = self._require_model(req.identity)
        with self._admitted():
            return await generation.generate(
                model,
                req,
                self._request_id(req.correlation_id, req.describe),
                send,
                count=self.counters.add,
                debug=self.config.debug_requests,
            )

    # ---- tokenizer ----------------------------------------------------------

    @_unary
    async def TokenizeString(
        self, request: pb.PredictOptions, context: grpc.aio.ServicerContext
    ) -> pb.TokenizationResponse:
        model = self._require_model(request.ModelIdentity)
        ids = model.engine.tokenize(request.Prompt)
        return pb.TokenizationResponse(length=len(ids), tokens=ids)

    @_unary
    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        model = self._require_model()
        return pb.DetokenizeResponse(content=model.engine.detokenize(list(request.tokens)))

    @_unary
    async def ModelMetadata(
        self, request: pb.ModelOptions, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return model_metadata(self._require_model())

    @_unary
    async def GetMetrics(
        self, request: pb.MetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.MetricsResponse:
        """The worker's Prometheus counters (backend/metrics.py), all models together.

        tokens_per_second: tokens generated per second since the previous
        GetMetrics call (or start-up), all requests together; tokens_generated
        and prompt_tokens_processed: totals since start-up (int32: they stop at
        2**31-1 here, the Prometheus counters do not)."""
        counters = self.counters
        return pb.MetricsResponse(
            tokens_per_second=counters.tokens_per_second(),
            tokens_generated=counters.generated_tokens_total,
            prompt_tokens_processed=counters.prompt_tokens_total,
        )

    @_unary
    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        model = self._require_model(request.ModelIdentity)
        with self._admitted():
            return await score(model, request, f"score-{next(self._ids)}")

    @_unary
    async def Rerank(
        self, request: pb.RerankRequest, context: grpc.aio.ServicerContext
    ) -> pb.RerankResult:
        model = self._require_model(request.ModelIdentity)
        with self._admitted():
            result = await pooling.rerank(model, request, f"rerank-{next(self._ids)}")
            self.counters.add(result.usage.prompt_tokens, 0)
            return result

    @_unary
    async def Embedding(
        self, request: pb.PredictOptions, context: grpc.aio.ServicerContext
    ) -> pb.EmbeddingResult:
        model = self._require_model(request.ModelIdentity)
        with self._admitted():
            rid = self._request_id(request.CorrelationId, lambda: _describe(request))
            result = await pooling.embed(model, request, rid)
            self.counters.add(result.prompt_tokens, 0)
            return result


def _describe(request: Any) -> str:
    return str(text_format.MessageToString(request, as_one_line=True))[:4000]
