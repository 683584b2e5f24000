"""`--metrics-addr`: a real worker's Prometheus page moves by exactly the traffic sent.

One worker with its own metrics port and `--max-concurrent-requests 1` (so a
refusal can be provoked deterministically while a stream is held open). Each
step scrapes before and after and compares deltas, for the worker's own
counters and for vLLM's (`vllm:*`, from the AsyncLLM in the worker process).
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend.gen import backend_pb2 as pb
from tests import engine_control
from tests.conftest import Worker, free_port, retire, tiny_load_options

pytestmark = pytest.mark.integration

K = 5  # tokens per Predict: IgnoreEOS makes it exact
N = 3  # Predict calls
LONG = 1900  # a stream held unfinished by a stopped engine core (see the cancel test)


class Page:
    """One scrape: samples by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [
            (s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels` (0 if none)."""
        return sum(v for n, ls, v in self.samples if n == name and labels.items() <= ls.items())

    def has(self, prefix: str) -> bool:
        return any(n.startswith(prefix) for n, _, _ in self.samples)


# The page each module worker served before any test could load a model in it
# (scraped by `metered`): the before-load test reads it, whatever order the
# module's tests run in.
BEFORE_LOAD: dict[str, Page] = {}


@pytest.fixture(scope="module")
def metered() -> Iterator[tuple[Worker, str]]:
    port = free_port()
    w = Worker(
        args=["--metrics-addr", str(port), "--max-concurrent-requests", "1", "--debug-requests"]
    )
    url = f"http://127.0.0.1:{port}/metrics"
    BEFORE_LOAD[url] = scrape(url)
    yield w, url
    retire(w)


def scrape(url: str) -> Page:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        return Page(r.read().decode())


def settle(url: str, name: str, expected: float, timeout: float = 60.0, **labels: str) -> Page:
    """Scrape until `name` reaches `expected` (vLLM records stats in its output
    loop, just after the outputs it delivers); it must then equal it."""
    deadline = time.monotonic() + timeout
    while True:
        page = scrape(url)
        if page.value(name, **labels) >= expected or time.monotonic() > deadline:
            assert page.value(name, **labels) == expected, (name, labels)
            return page
        time.sleep(0.1)


def greedy(tokens: int, **kw) -> pb.PredictOptions:
    return pb.PredictOptions(
        Prompt="The weather in Paris is", Tokens=tokens, Temperature=0.0, IgnoreEOS=True, **kw
    )


def handled(page: Page, method: str, code: str) -> float:
    return page.value("grpc_server_handled_total", grpc_method=method, grpc_code=code)


def test_endpoint_serves_only_the_worker_metrics_before_a_model_is_loaded(metered):
    worker, url = metered
    page = BEFORE_LOAD[url]
    assert page.value("backend_requests_in_flight", model_name="") == 0
    assert not page.has("vllm:")
    assert page.has("process_cpu_seconds")
    # Loopback only: the flag gave a bare port.
    assert "Prometheus metrics on http://127.0.0.1:" in worker.log_tail(200)


def test_dropped_connections_are_counted_by_reason_and_logged_once(metered):
    """Three peers that are not HTTP/2 clients: three GOAWAY(PROTOCOL_ERROR)
    drops on the page, one warning in the log (its rate is limited)."""
    worker, url = metered
    before = scrape(url).value("backend_connections_dropped_total", reason="PROTOCOL_ERROR")
    logged = worker.log_tail(10_000).count("not an HTTP/2 client preface")
    host, port = worker.addr.rsplit(":", 1)
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            while sock.recv(65536):  # the GOAWAY, then the close: the count came first
                pass
    page = scrape(url)
    assert page.value("backend_connections_dropped_total", reason="PROTOCOL_ERROR") == before + 3
    # Each warning is written (line-buffered stderr) before its close.
    assert worker.log_tail(10_000).count("not an HTTP/2 client preface") - logged == 1


def test_counters_move_by_exactly_the_traffic_sent(metered, tiny_model_dir):
    worker, url = metered
    result = worker.stub.LoadModel(tiny_load_options(tiny_model_dir), timeout=600)
    assert result.success, f"{result.message}\n{worker.log_tail()}"
    model = str(tiny_model_dir)  # vLLM's served model name: the path it loaded

    # -- N unary Predicts of exactly K tokens -------------------------------------
    before = scrape(url)
    replies = [worker.stub.Predict(greedy(K), timeout=300) for _ in range(N)]
    assert [r.tokens for r in replies] == [K] * N
    prompt = sum(r.prompt_tokens for r in replies)
    assert prompt > 0
    vllm_gen = before.value("vllm:generation_tokens_total", model_name=model)
    after = settle(url, "vllm:generation_tokens_total", vllm_gen + N * K, model_name=model)
    assert handled(after, "Predict", "OK") - handled(before, "Predict", "OK") == N
    for name, delta in (
        ("backend_generation_tokens_total", N * K),
        ("backend_prompt_tokens_total", prompt),
        ("vllm:prompt_tokens_total", prompt),
    ):
        assert after.value(name, model_name=model) - before.value(name, model_name=model) == delta
    success = {"model_name": model, "finished_reason": "length"}
    assert (
        after.value("vllm:request_success_total", **success)
        - before.value("vllm:request_success_total", **success)
        == N
    )
    assert after.has("vllm:time_to_first_token_seconds")
    assert after.has("vllm:kv_cache_usage_perc")

    # GetMetrics answers from the same counters (the call itself counts as OK).
    metrics = worker.stub.GetMetrics(pb.MetricsRequest(), timeout=30)
    assert metrics.tokens_generated == after.value("backend_generation_tokens_total")
    assert metrics.prompt_tokens_processed == after.value("backend_prompt_tokens_total")

    # -- one error: counted under its code, no tokens -----------------------------
    before = scrape(url)
    with pytest.raises(grpc.RpcError) as err:
        worker.stub.Predict(greedy(K, LogitBias="[1]"), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(url)
    assert (
        handled(after, "Predict", "INVALID_ARGUMENT")
        - handled(before, "Predict", "INVALID_ARGUMENT")
        == 1
    )
    assert handled(after, "Predict", "OK") == handled(before, "Predict", "OK")
    assert after.value("backend_generation_tokens_total") == before.value(
        "backend_generation_tokens_total"
    )

    # -- one cancel, and one refusal while the stream holds the only slot -----------
    _cancel_a_stream(worker, url, model)


def _cancel_a_stream(worker: Worker, url: str, model: str) -> None:
    """A LONG-token stream is cancelled while the engine core is stopped.

    The precondition "unfinished when cancelled" is created, not raced: the
    core is SIGSTOPped before the stream is sent (stopping it on the stream's
    first output raced the engine on a loaded machine), so the generation
    cannot finish whatever the machine's speed; the worker's log shows the
    request reached vLLM, and the held slot is checked before the cancel."""
    before = scrape(url)
    core = engine_control.engine_core_of(worker.proc.pid)
    since = worker.log_path.stat().st_size
    with engine_control.stopped(core):
        call = worker.stub.PredictStream(greedy(LONG, CorrelationId="metrics-cancel"), timeout=600)
        assert engine_control.wait_logged(worker.log_path, ["metrics-cancel"], since=since), (
            worker.log_tail()
        )
        # The stream is admitted and running: the one slot is taken.
        held = scrape(url)
        assert held.value("backend_requests_in_flight", model_name=model) == 1
        with pytest.raises(grpc.RpcError) as err:
            worker.stub.Predict(greedy(K), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not call.done()
        call.cancel()
        # The server learns of the cancel asynchronously; wait for it to be counted.
        deadline = time.monotonic() + 60
        while True:
            after = scrape(url)
            done = sum(
                handled(after, "PredictStream", c) - handled(before, "PredictStream", c)
                for c in ("OK", "CANCELLED", "UNAVAILABLE")
            )
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert done == 1, after.text
    assert (
        handled(after, "PredictStream", "CANCELLED") - handled(before, "PredictStream", "CANCELLED")
        == 1
    ), after.text
    assert (
        after.value("backend_requests_refused_total", model_name=model)
        - before.value("backend_requests_refused_total", model_name=model)
        == 1
    )
    assert (
        handled(after, "Predict", "RESOURCE_EXHAUSTED")
        - handled(before, "Predict", "RESOURCE_EXHAUSTED")
        == 1
    )
    assert (
        after.value("backend_stream_cancellations_total", model_name=model)
        - before.value("backend_stream_cancellations_total", model_name=model)
        == 1
    )
    generated = after.value("backend_generation_tokens_total") - before.value(
        "backend_generation_tokens_total"
    )
    assert 0 <= generated < LONG  # none: the core never ran while the stream lived
    assert after.value("backend_requests_in_flight", model_name=model) == 0
    # vLLM aborted the engine request: nothing left running there (its gauge
    # moves with the core's next step, so after the core runs again).
    settle(url, "vllm:num_requests_running", 0, model_name=model)


@pytest.mark.long
def test_free_and_reload_keep_the_page_whole(metered, tiny_model_dir):
    worker, url = metered
    model = str(tiny_model_dir)
    # Its own precondition, whatever ran before in the module: a loaded model
    # (the counters test leaves one) and traffic, so there are engine numbers to
    # drop and ours to keep.
    if worker.stub.Status(pb.HealthMessage(), timeout=10).state != pb.StatusResponse.READY:
        result = worker.stub.LoadModel(tiny_load_options(tiny_model_dir), timeout=600)
        assert result.success, f"{result.message}\n{worker.log_tail()}"
    assert worker.stub.Predict(greedy(K), timeout=300).tokens == K
    before = scrape(url)
    ours = before.value("backend_generation_tokens_total")
    assert ours >= K

    assert worker.stub.Free(pb.HealthMessage(), timeout=120).success
    freed = scrape(url)
    assert not freed.has("vllm:")  # no stale engine numbers once the engine is gone
    assert freed.value("backend_generation_tokens_total") == ours  # ours outlive the engine

    result = worker.stub.LoadModel(tiny_load_options(tiny_model_dir), timeout=600)
    assert result.success, f"{result.message}\n{worker.log_tail()}"
    reloaded = scrape(url)
    assert reloaded.has("vllm:num_requests_running")
    # A new AsyncLLM: its counters start again at 0 ...
    assert reloaded.value("vllm:generation_tokens_total", model_name=model) == 0
    assert worker.stub.Predict(greedy(K), timeout=300).tokens == K
    # ... and count this engine's traffic exactly, once (no duplicate series).
    page = settle(url, "vllm:generation_tokens_total", K, model_name=model)
    assert page.value("backend_generation_tokens_total") == ours + K
    series = [
        (n, tuple(sorted(ls.items())))
        for n, ls, _ in page.samples
        if n == "vllm:generation_tokens_total"
    ]
    assert len(series) == len(set(series)) == 1
    assert "Duplicated timeseries" not in worker.log_tail(2000)
