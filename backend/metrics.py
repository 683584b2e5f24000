"""The worker's Prometheus metrics, and the HTTP endpoint serving them with vLLM's.

vLLM's `AsyncLLM` lives in this process and, unless the model was loaded with
`DisableLogStatus`, its `PrometheusStatLogger` registers the `vllm:*` metrics
(running/waiting requests, KV-cache usage, prefix-cache hits, preemptions,
TTFT / inter-token / end-to-end latency histograms, token counters) on
prometheus_client's global `REGISTRY`, labelled `model_name` (the served model
name) and `engine`. Each new `AsyncLLM` unregisters the previous one's
collectors before registering its own, and `Engine.shutdown` unregisters them
on Free, so a Free/LoadModel cycle never registers a name twice and a freed
worker exports no stale engine numbers. vLLM's counters so start at 0 with each
LoadModel; the worker's own below live as long as the process.

The worker's metrics have a registry of their own (several servicers may live
in one test process); the endpoint serves both registries as one page.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server

from backend.config import split_addr

log = logging.getLogger(__name__)

SERVICE = "backend.Backend"
# GetMetrics' counters are int32 on the wire.
_INT32_MAX = 2**31 - 1


class _InFlight:
    """`backend_requests_in_flight`: read at scrape time, never stale."""

    def __init__(self, model_name: Callable[[], str], active: Callable[[], int]) -> None:
        self._model_name = model_name
        self._active = active

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "backend_requests_in_flight",
            "Generation and pooling requests admitted and not yet finished "
            "(what --max-concurrent-requests caps)",
            labels=["model_name"],
        )
        gauge.add_metric([self._model_name()], self._active())
        yield gauge


class _Dropped:
    """`backend_connections_dropped`: the h2 transport's own tally, read at scrape time."""

    def __init__(self, totals: Callable[[], dict[str, int]]) -> None:
        self._totals = totals

    def collect(self) -> Iterator[Metric]:
        counter = CounterMetricFamily(
            "backend_connections_dropped",
            "Connections the h2 transport closed on the peer's account, by reason: evicted (the "
            "one idle longest, for a new one at BACKEND_MAX_CONNECTIONS), over_cap (a new one "
            "when every connection has a call running), no_preface (BACKEND_HANDSHAKE_TIMEOUT_S), "
            "or the HTTP/2 error code of the GOAWAY it sent (ENHANCE_YOUR_CALM: a flood)",
            labels=["reason"],
        )
        for reason, total in sorted(dict(self._totals()).items()):
            counter.add_metric([reason], total)
        yield counter


class WorkerMetrics:
    """The worker's counters: the one source of the Prometheus page and GetMetrics.

    `model_name` and `active` are read when a value is recorded or scraped:
    the served name of the model loaded now ("" when none) and the number of
    requests running.
    """

    def __init__(
        self,
        model_name: Callable[[], str] = lambda: "",
        active: Callable[[], int] = lambda: 0,
    ) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r = self.registry
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed, by method and gRPC status code (CANCELLED: the client "
            "cancelled, its deadline passed or the server stopped)",
            ["grpc_service", "grpc_method", "grpc_code", "model_name"],
            registry=r,
        )
        self.refused = Counter(
            "backend_requests_refused",
            "Requests refused with RESOURCE_EXHAUSTED (--max-concurrent-requests reached)",
            ["model_name"],
            registry=r,
        )
        self.stream_cancellations = Counter(
            "backend_stream_cancellations",
            "PredictStream calls cancelled before their last message (the engine "
            "request is aborted)",
            ["model_name"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "backend_prompt_tokens",
            "Prompt tokens of generation, embedding and rerank requests",
            ["model_name"],
            registry=r,
        )
        self.generation_tokens = Counter(
            "backend_generation_tokens",
            "Tokens generated (a cancelled stream counts what it produced before)",
            ["model_name"],
            registry=r,
        )
        r.register(_InFlight(model_name, active))  # type: ignore[arg-type]
        self._window_start = time.monotonic()
        self._window_tokens = 0

    def count_dropped_connections(self, totals: Callable[[], dict[str, int]]) -> None:
        """Export the transport's dropped-connection tally (h2 only: C-core keeps its own)."""
        self.registry.register(_Dropped(totals))  # type: ignore[arg-type]

    # ---- recording -----------------------------------------------------------

    def rpc_done(self, method: str, code: str) -> None:
        """One RPC finished with gRPC status `code` (its name: "OK", "CANCELLED", ...)."""
        model = self.model_name()
        self.handled.labels(SERVICE, method, code, model).inc()
        if code == "RESOURCE_EXHAUSTED":
            self.refused.labels(model).inc()
        elif code == "CANCELLED" and method == "PredictStream":
            self.stream_cancellations.labels(model).inc()

    def add(self, prompt_tokens: int, generated_tokens: int) -> None:
        model = self.model_name()
        if prompt_tokens:
            self.prompt_tokens.labels(model).inc(prompt_tokens)
        if generated_tokens:
            self.generation_tokens.labels(model).inc(generated_tokens)

    # ---- GetMetrics -------------------------------------------------------------

    def _total(self, name: str) -> int:
        return int(
            sum(
                sample.value
                for family in self.registry.collect()
                for sample in family.samples
                if sample.name == name
            )
        )

    @property
    def prompt_tokens_total(self) -> int:
        """Prompt tokens since start-up, all models: GetMetrics' prompt_tokens_processed."""
        return min(self._total("backend_prompt_tokens_total"), _INT32_MAX)

    @property
    def generated_tokens_total(self) -> int:
        """Tokens generated since start-up, all models: GetMetrics' tokens_generated.

        Both are int32 on the wire: they stop at 2**31-1 there (the Prometheus
        counters do not)."""
        return min(self._total("backend_generation_tokens_total"), _INT32_MAX)

    def tokens_per_second(self) -> float:
        """GetMetrics' tokens_per_second: tokens generated per second since the
        previous GetMetrics call (or since start-up), across all concurrent
        requests — the worker's current decode throughput."""
        now = time.monotonic()
        total = self._total("backend_generation_tokens_total")
        elapsed = now - self._window_start
        delta = total - self._window_tokens
        self._window_start, self._window_tokens = now, total
        return delta / elapsed if elapsed > 0 else 0.0


class _Both:
    """One collector over several registries: the page the endpoint serves."""

    def __init__(self, registries: Iterable[CollectorRegistry]) -> None:
        self._registries = tuple(registries)

    def collect(self) -> Iterator[Metric]:
        for registry in self._registries:
            yield from registry.collect()


class MetricsServer:
    """prometheus_client's HTTP server (a daemon thread) serving vLLM's and our metrics."""

    def __init__(self, addr: str, metrics: WorkerMetrics) -> None:
        self.host, self.port = split_addr(addr)
        self._page = _Both((REGISTRY, metrics.registry))
        self._httpd: Any = None

    def start(self) -> int:
        """Listen; the port bound (useful with port 0)."""
        try:
            self._httpd, _ = start_http_server(
                self.port,
                self.host,
                registry=self._page,  # type: ignore[arg-type]
            )
        except OSError as exc:
            raise SystemExit(f"cannot serve metrics on {self.host}:{self.port}: {exc}") from None
        self.port = int(self._httpd.server_address[1])
        log.info("Prometheus metrics on http://%s:%d/metrics", self.host, self.port)
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
