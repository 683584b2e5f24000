"""The gateway's llama.cpp-family settings on the real engine (issue 28): what vLLM
derives from the mapped ones (max_model_len from RoPE scaling, the RoPE parameters
its config holds, the KV cache type, the model runner's CPU binding), the ignored
ones logged once with their reason, and values vLLM cannot take refused before the
serving model is touched. Two engine starts: linear scaling, then YaRN.
The pure mapping is tests/unit/test_gateway_settings.py."""

from __future__ import annotations

import ast
import math
import re

import pytest

from backend import gateway_settings as gs
from backend.gen import backend_pb2 as pb
from tests.conftest import Worker, retire, tiny_load_options

pytestmark = pytest.mark.integration

TINY_MAX_POSITIONS = 4096  # the tiny model's max_position_embeddings
ENGINE_USES = re.compile(r"the engine uses rope_parameters (\{.*?\}), max_model_len (\d+)")
NOT_USED = "settings accepted and not used: "
IGNORED = dict(
    MMap=True,
    MLock=True,
    NUMA=True,
    NGPULayers=99,
    FlashAttention="on",
    NoKVOffload=True,
    LowVRAM=True,
    TensorSplit="1,1",
    MainGPU="0",
    YarnExtFactor=0.5,
)


# The worker runs with VLLM_CPU_NUM_OF_RESERVED_CPU=0, so Threads=2 can bind two
# CPUs on a 2-CPU machine (by default vLLM's one reserved CPU stays free).
RESERVED = 0


def _expected_binding(threads: int) -> str:
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list

    cpus = [(c.id, c.physical_core) for c in get_allowed_cpu_list()]
    bind, _ = gs.thread_binding(threads, cpus, 1, RESERVED)
    assert bind is not None
    return bind


class Loaded:
    def __init__(self, worker: Worker, result: pb.Result, since: int) -> None:
        self.worker = worker
        self.result = result
        self.log = worker.log_path.read_text(errors="replace")[since:]

    def engine_rope(self) -> tuple[dict, int]:
        (found,) = ENGINE_USES.findall(self.log)
        return ast.literal_eval(found[0]), int(found[1])

    def not_used_lines(self) -> list[str]:
        return [line for line in self.log.splitlines() if NOT_USED in line]


def _load(worker: Worker, model_dir, **fields) -> Loaded:
    since = worker.log_path.stat().st_size
    result = worker.stub.LoadModel(tiny_load_options(model_dir, **fields), timeout=600)
    worker._log.flush()
    return Loaded(worker, result, since)


@pytest.fixture(scope="module")
def worker():
    w = Worker(env={gs.RESERVED_ENV: str(RESERVED)})
    yield w
    retire(w)


@pytest.fixture(scope="module")
def linear(worker, tiny_model_dir) -> Loaded:
    loaded = _load(
        worker,
        tiny_model_dir,
        MaxModelLen=0,  # let vLLM derive it
        RopeScaling="linear",
        RopeFreqScale=0.5,
        RopeFreqBase=20000.0,
        CacheTypeKey="fp8",
        Threads=1,
        YarnBetaFast=16.0,  # only used with YaRN
        **IGNORED,
    )
    assert loaded.result.success, f"{loaded.result.message}\n{worker.log_tail()}"
    return loaded


def test_linear_rope_scaling_doubles_the_max_model_len_vllm_derives(linear):
    assert f"max_model_len {2 * TINY_MAX_POSITIONS}" in linear.result.message
    params, max_len = linear.engine_rope()
    assert max_len == 2 * TINY_MAX_POSITIONS
    assert params == {"rope_theta": 20000.0, "rope_type": "linear", "factor": 2.0}


def test_cache_type_sets_the_engines_kv_cache_dtype(linear):
    # vLLM's own line describing the engine it starts.
    assert re.search(r"Initializing a V1 LLM engine .*kv_cache_dtype=fp8,", linear.log)
    got = linear.worker.stub.Predict(
        pb.PredictOptions(Prompt="The weather", Tokens=8, IgnoreEOS=True), timeout=120
    )
    assert got.tokens == 8


def test_threads_set_the_model_runners_cpu_binding(linear):
    bind = _expected_binding(1)
    # vLLM's engine core reports the binding it applies.
    assert f"VLLM_CPU_OMP_THREADS_BIND={bind!r}, auto_setup=False" in linear.log
    assert f"local_rank=0, core ids=[{bind}]" in linear.log


def test_each_ignored_setting_is_logged_once_with_its_reason(linear):
    lines = linear.not_used_lines()
    text = "\n".join(lines)
    for name in IGNORED:
        assert text.count(f"{name}=") == 1, (name, lines)
        if name in gs.FIELDS and gs.FIELDS[name][0] == gs.IGNORED:
            assert gs.FIELDS[name][1] in text, name
    assert "MainGPU=0: this vLLM runs on CPU" in text
    assert text.count("YarnBetaFast=16: only used with YaRN") == 1
    assert all(" INFO " in line for line in lines), lines


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"CacheTypeKey": "q4_0"}, ["CacheTypeKey 'q4_0'", "fp8_e5m2", "float16"]),
        ({"CacheTypeKey": "fp8", "CacheTypeValue": "auto"}, ["CacheTypeKey and CacheTypeValue"]),
        ({"RopeScaling": "dynamic"}, ["RopeScaling 'dynamic'", "none, linear, yarn"]),
        ({"RopeScaling": "yarn"}, ["needs RopeFreqScale"]),
        ({"Threads": -1}, ["Threads must be >= 0"]),
    ],
)
def test_a_value_vllm_cannot_take_fails_load_model_and_the_model_keeps_serving(
    linear, tiny_model_dir, fields, words
):
    failed = _load(linear.worker, tiny_model_dir, **fields)
    assert not failed.result.success
    for word in words:
        assert word in failed.result.message, failed.result.message
    # Refused before the serving model was released: it still answers.
    assert "stopped the engine" not in failed.log
    got = linear.worker.stub.Predict(
        pb.PredictOptions(Prompt="x", Tokens=2, IgnoreEOS=True), timeout=120
    )
    assert got.tokens == 2


def test_yarn_extends_the_length_and_carries_its_parameters(linear, tiny_model_dir):
    """Runs after the linear checks (it replaces that model)."""
    yarn = _load(
        linear.worker,
        tiny_model_dir,
        MaxModelLen=0,
        RopeScaling="yarn",
        RopeFreqScale=0.25,
        YarnAttnFactor=1.0,
        YarnBetaFast=16.0,
        YarnBetaSlow=2.0,
        Threads=2,
    )
    assert yarn.result.success, yarn.result.message
    assert f"max_model_len {4 * TINY_MAX_POSITIONS}" in yarn.result.message
    params, max_len = yarn.engine_rope()
    assert max_len == 4 * TINY_MAX_POSITIONS
    assert params == {
        "rope_theta": 10000.0,
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": TINY_MAX_POSITIONS,
        "attention_factor": pytest.approx(0.1 * math.log(4.0) + 1.0),
        "beta_fast": 16.0,
        "beta_slow": 2.0,
    }
    bind = _expected_binding(2)
    assert f"VLLM_CPU_OMP_THREADS_BIND={bind!r}, auto_setup=False" in yarn.log
    assert yarn.not_used_lines() == []
    got = yarn.worker.stub.Predict(
        pb.PredictOptions(Prompt="The weather", Tokens=8, IgnoreEOS=True), timeout=120
    )
    assert got.tokens == 8
