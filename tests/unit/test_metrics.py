"""The worker's metrics: flag parsing, what is recorded, the page served, GetMetrics' limits."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import REGISTRY, Counter
from prometheus_client.parser import text_string_to_metric_families

from backend.config import parse_config, split_addr
from backend.metrics import MetricsServer, WorkerMetrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_endpoint_is_off_by_default_and_has_an_env_twin():
    assert parse_config([], env={}).metrics_addr is None
    assert parse_config([], env={"BACKEND_METRICS_ADDR": "127.0.0.1:9100"}).metrics_addr == (
        "127.0.0.1:9100"
    )
    config = parse_config(["--metrics-addr", "0.0.0.0:9200"], env={"BACKEND_METRICS_ADDR": "1"})
    assert config.metrics_addr == "0.0.0.0:9200"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("9100", ("127.0.0.1", 9100)),
        (":9100", ("127.0.0.1", 9100)),
        ("localhost:9100", ("localhost", 9100)),
        ("[::1]:9100", ("::1", 9100)),
    ],
)
def test_a_bare_port_means_loopback(given, expected):
    assert split_addr(given) == expected


@pytest.mark.parametrize("bad", ["host:", "host:http", "1.2.3.4:70000", "host:-1"])
def test_bad_metrics_address_is_refused_at_start_up(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--metrics-addr", bad], env={})
    assert "HOST:PORT" in str(exc.value)


def test_rpc_codes_refusals_cancellations_and_tokens_are_counted_per_model():
    model = ["m1"]
    active = [2]
    metrics = WorkerMetrics(lambda: model[0], lambda: active[0])
    metrics.rpc_done("Predict", "OK")
    metrics.rpc_done("Predict", "OK")
    metrics.rpc_done("Predict", "RESOURCE_EXHAUSTED")
    metrics.rpc_done("PredictStream", "CANCELLED")
    metrics.rpc_done("Embedding", "CANCELLED")  # not a stream: no stream cancellation
    metrics.add(7, 5)
    model[0] = "m2"
    metrics.add(3, 0)
    from prometheus_client import generate_latest

    got = _samples(generate_latest(metrics.registry).decode())

    def handled(method: str, code: str) -> float:
        key = (
            "grpc_server_handled_total",
            (
                ("grpc_code", code),
                ("grpc_method", method),
                ("grpc_service", "backend.Backend"),
                ("model_name", "m1"),
            ),
        )
        return got[key]

    assert handled("Predict", "OK") == 2
    assert handled("Predict", "RESOURCE_EXHAUSTED") == 1
    assert handled("PredictStream", "CANCELLED") == 1
    assert got[("backend_requests_refused_total", (("model_name", "m1"),))] == 1
    assert got[("backend_stream_cancellations_total", (("model_name", "m1"),))] == 1
    assert got[("backend_prompt_tokens_total", (("model_name", "m1"),))] == 7
    assert got[("backend_prompt_tokens_total", (("model_name", "m2"),))] == 3
    assert got[("backend_generation_tokens_total", (("model_name", "m1"),))] == 5
    assert ("backend_generation_tokens_total", (("model_name", "m2"),)) not in got
    assert got[("backend_requests_in_flight", (("model_name", "m2"),))] == 2
    # GetMetrics: all models together.
    assert (metrics.prompt_tokens_total, metrics.generated_tokens_total) == (10, 5)


def test_get_metrics_counters_stop_at_int32_max_the_page_does_not():
    metrics = WorkerMetrics()
    metrics.add(0, 2**31 + 5)
    assert metrics.generated_tokens_total == 2**31 - 1
    assert metrics.tokens_per_second() > 0
    assert metrics.tokens_per_second() == 0.0  # nothing new since the previous call


def test_two_workers_metrics_in_one_process_do_not_collide():
    WorkerMetrics().add(1, 1)
    WorkerMetrics().add(1, 1)  # a duplicate registration would raise ValueError


def test_endpoint_serves_vllm_registry_and_ours_on_one_page():
    vllm_like = Counter("vllm:unit_test_probe", "stands in for vLLM's metrics", ["model_name"])
    try:
        vllm_like.labels("m").inc(4)
        metrics = WorkerMetrics(lambda: "m")
        metrics.add(2, 3)
        server = MetricsServer("127.0.0.1:0", metrics)
        port = server.start()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                got = _samples(r.read().decode())
        finally:
            server.stop()
        assert got[("vllm:unit_test_probe_total", (("model_name", "m"),))] == 4
        assert got[("backend_generation_tokens_total", (("model_name", "m"),))] == 3
        assert any(name == "process_cpu_seconds_total" for name, _ in got)
    finally:
        REGISTRY.unregister(vllm_like)
