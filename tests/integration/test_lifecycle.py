"""Load / Free / reload and the before-load contract, on pooled workers."""

from __future__ import annotations

import grpc
import psutil
import pytest

from backend.gen import backend_pb2 as pb
from tests.conftest import Workers, tiny_load_options
from tests.engine_control import engine_processes

pytestmark = pytest.mark.integration


@pytest.fixture
def fresh(workers: Workers):
    """A pooled worker with no model loaded (its last load may have failed)."""
    with workers.use() as w:
        yield w


@pytest.fixture
def pristine(workers: Workers):
    """A pooled worker with no model loaded and no failed load: Status UNINITIALIZED."""
    with workers.use(pristine=True) as w:
        yield w


def test_worker_serves_on_uvloop_and_h2_by_default(fresh):
    # uvloop makes each streamed message cheaper (bench/results/README.md);
    # h2 is the default transport (README "Transport": CPU per message, and the
    # hostile-peer suite it passes).
    tail = fresh.log_text()
    assert "event loop uvloop" in tail and "transport h2" in tail


def test_grpcio_transport_still_serves(workers, tiny_model_dir):
    """`--transport grpcio` (grpc.aio) stays a working choice: load, unary,
    stream with usage, an error status, Free."""
    with workers.use(env={"BACKEND_TRANSPORT": "grpcio"}) as w:
        assert "transport grpcio" in w.log_text()
        result = w.stub.LoadModel(tiny_load_options(tiny_model_dir), timeout=300)
        assert result.success, result.message
        request = pb.PredictOptions(Prompt="hi", Tokens=6, IgnoreEOS=True)
        assert w.stub.Predict(request, timeout=120).tokens == 6
        chunks = list(w.stub.PredictStream(request, timeout=120))
        assert chunks[-1].tokens == 6 and len(chunks) >= 2
        with pytest.raises(grpc.RpcError) as err:
            w.stub.Predict(pb.PredictOptions(Prompt="hi", LogitBias="[1]"), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert w.stub.Free(pb.HealthMessage(), timeout=120).success


def test_before_load_rpcs_fail_with_failed_precondition(pristine):
    fresh = pristine
    assert fresh.stub.Status(pb.HealthMessage()).state == pb.StatusResponse.UNINITIALIZED
    for call, request in (
        (fresh.stub.Predict, pb.PredictOptions(Prompt="hi")),
        (fresh.stub.TokenizeString, pb.PredictOptions(Prompt="hi")),
        (fresh.stub.Detokenize, pb.DetokenizeRequest(tokens=[1])),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "LoadModel" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(fresh.stub.PredictStream(pb.PredictOptions(Prompt="hi"), timeout=10))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("options", "fields", "fragment"),
    [
        (["--max-num-seqz:8"], {}, "did you mean 'max_num_seqs'"),
        (["tool_parser:nonesuch"], {}, "valid names"),
        (["tool_parser"], {}, "has no value"),
        ([], {"EngineArgs": '{"max_modl_len": 1}'}, "did you mean 'max_model_len'"),
        ([], {"EngineArgs": "{"}, "EngineArgs is not valid JSON"),
        ([], {"Model": "/nonexistent/model/dir"}, ""),
    ],
)
def test_bad_load_reports_failure_and_the_worker_stays_usable(
    fresh, tiny_model_dir, options, fields, fragment
):
    result = fresh.stub.LoadModel(
        tiny_load_options(tiny_model_dir, *options, **fields), timeout=300
    )
    assert not result.success
    assert result.message.startswith("failed to load model")
    assert fragment in result.message
    assert fresh.stub.Health(pb.HealthMessage(), timeout=5).message == b"OK"


def test_engine_start_failure_is_reported_not_raised(fresh, tiny_model_dir):
    # Far more KV cache than the machine has: the engine itself fails to start.
    result = fresh.stub.LoadModel(
        tiny_load_options(
            tiny_model_dir, kv_cache=False, GPUMemoryUtilization=1.0, MaxModelLen=4096
        ),
        timeout=300,
    )
    assert not result.success, result.message
    assert not engine_processes(fresh.proc.pid, unreaped=True), (
        "a failed start must not leave engine processes"
    )


@pytest.mark.long  # test_load_free_cycles checks Free and reload per cycle, FAILED_PRECONDITION too
def test_load_free_reload_releases_the_engine(fresh, tiny_model_dir):
    result = fresh.stub.LoadModel(tiny_load_options(tiny_model_dir), timeout=300)
    assert result.success, f"{result.message}\n{fresh.log_tail()}"
    assert fresh.stub.Status(pb.HealthMessage()).state == pb.StatusResponse.READY
    children = engine_processes(fresh.proc.pid)
    assert children, "vLLM runs its engine core in a child process"
    loaded_rss = fresh.stub.Status(pb.HealthMessage()).memory.total
    assert (
        fresh.stub.Predict(
            pb.PredictOptions(Prompt="hi", Tokens=3, IgnoreEOS=True), timeout=60
        ).tokens
        == 3
    )

    freed = fresh.stub.Free(pb.HealthMessage(), timeout=120)
    assert freed.success
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"engine processes still alive after Free: {alive}"
    assert not engine_processes(fresh.proc.pid, unreaped=True), (
        "exited engine processes are reaped, not left as zombies"
    )
    assert fresh.stub.Status(pb.HealthMessage()).memory.total < loaded_rss
    with pytest.raises(grpc.RpcError) as err:
        fresh.stub.Predict(pb.PredictOptions(Prompt="hi"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    again = fresh.stub.LoadModel(tiny_load_options(tiny_model_dir), timeout=300)
    assert again.success, again.message
    assert (
        fresh.stub.Predict(
            pb.PredictOptions(Prompt="hi", Tokens=3, IgnoreEOS=True), timeout=60
        ).tokens
        == 3
    )


@pytest.mark.long  # test_cut_requests replaces a loaded model too (old engine gone), mid-request
def test_load_on_a_loaded_worker_replaces_the_model(fresh, tiny_model_dir):
    first = fresh.stub.LoadModel(tiny_load_options(tiny_model_dir), timeout=300)
    assert first.success
    old = engine_processes(fresh.proc.pid)
    second = fresh.stub.LoadModel(tiny_load_options(tiny_model_dir, MaxModelLen=1024), timeout=300)
    assert second.success, second.message
    assert "max_model_len 1024" in second.message
    _, alive = psutil.wait_procs(old, timeout=30)
    assert old and not alive, "the old engine is shut down before the new one serves"
    assert engine_processes(fresh.proc.pid)
    assert (
        fresh.stub.Predict(
            pb.PredictOptions(Prompt="hi", Tokens=2, IgnoreEOS=True), timeout=60
        ).tokens
        == 2
    )


def test_cancelled_load_does_not_leave_an_engine_behind(fresh, tiny_model_dir):
    fresh.stub.Free(pb.HealthMessage(), timeout=120)
    with pytest.raises(grpc.RpcError) as err:
        fresh.stub.LoadModel(tiny_load_options(tiny_model_dir), timeout=2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The worker finishes the abandoned start and stops that engine before
    # the next load runs: afterwards exactly one engine serves. A liveness bound
    # over two engine starts and a stop (300 s ran out with the machine's load
    # average at 17-28, engine starts taking 60-250 s).
    result = fresh.stub.LoadModel(tiny_load_options(tiny_model_dir), timeout=900)
    assert result.success, result.message
    cores = engine_processes(fresh.proc.pid)
    assert all("VLLM" in p.name() for p in cores), cores
    cores = [p for p in cores if "EngineCore" in p.name()]
    assert len(cores) == 1, cores
    assert "cancelled during engine start" in fresh.log_tail(400)
