"""`run.sh serve` (backend/vllm_serve.py) is `vllm serve`: a follower node runs headless."""

from __future__ import annotations

import pytest
import vllm.entrypoints.cli.serve as serve  # explicit: needs the installed vLLM

from backend import vllm_serve


@pytest.fixture
def dispatched(monkeypatch):
    """Which of vLLM's launchers `serve` picked, with the args it got (none starts)."""
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(serve, "run_headless", lambda args: calls.append(("headless", args)))
    monkeypatch.setattr(
        serve.uvloop, "run", lambda coro: (coro.close(), calls.append(("api", coro)))
    )
    return calls


def test_headless_follower_starts_no_api_server(dispatched):
    vllm_serve.main(
        [
            "m",
            "--tensor-parallel-size=2",
            "--nnodes=2",
            "--node-rank=1",
            "--master-addr=10.0.0.1",
            "--headless",
        ]
    )
    ((kind, args),) = dispatched
    assert kind == "headless"
    assert (args.model, args.nnodes, args.node_rank, args.master_addr) == ("m", 2, 1, "10.0.0.1")


def test_without_headless_it_is_the_openai_server(dispatched):
    vllm_serve.main(["--model", "m", "--port", "0"])
    assert [kind for kind, _ in dispatched] == ["api"]
