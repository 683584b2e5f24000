"""backend/gateway_settings.py: each llama.cpp-family field the gateway sends is
mapped to its vLLM meaning or accepted and ignored with its reason (issue 28).
The engine's side (what vLLM derives from them) is
tests/integration/test_model_settings.py."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from backend import gateway_settings as gs
from backend.errors import InvalidArgument
from backend.gen import backend_pb2 as pb
from backend.load_options import build_load_plan
from backend.vllm_flags import flag_parser

ROOT = Path(__file__).resolve().parents[2]


def settings(cpu: bool = True, **fields) -> gs.GatewaySettings:
    return gs.gateway_settings(pb.ModelOptions(Model="m", **fields), flag_parser(), cpu=cpu)


# ---- the table -----------------------------------------------------------------------

LLAMA_CPP_FIELDS = {
    # name: (number, proto type) as the gateway's backend.proto has them
    "MLock": (6, "bool"),
    "MMap": (7, "bool"),
    "LowVRAM": (9, "bool"),
    "NUMA": (11, "bool"),
    "NGPULayers": (12, "int32"),
    "MainGPU": (13, "string"),
    "TensorSplit": (14, "string"),
    "Threads": (15, "int32"),
    "RopeFreqBase": (17, "float"),
    "RopeFreqScale": (18, "float"),
    "RopeScaling": (43, "string"),
    "YarnExtFactor": (44, "float"),
    "YarnAttnFactor": (45, "float"),
    "YarnBetaFast": (46, "float"),
    "YarnBetaSlow": (47, "float"),
    "FlashAttention": (56, "string"),
    "NoKVOffload": (57, "bool"),
    "CacheTypeKey": (63, "string"),
    "CacheTypeValue": (64, "string"),
}
PREDICT_FIELDS = {
    "EmbeddingTokens": (35, "int32", True),
    "RopeFreqBase": (37, "float", False),
    "RopeFreqScale": (38, "float", False),
    "MLock": (25, "bool", False),
    "MMap": (26, "bool", False),
    "MainGPU": (30, "string", False),
    "TensorSplit": (31, "string", False),
}
_TYPES = {"bool": 8, "int32": 5, "string": 9, "float": 2}  # FieldDescriptor.TYPE_*


def test_backend_proto_has_the_gateways_numbers_and_types():
    fields = pb.ModelOptions.DESCRIPTOR.fields_by_name
    for name, (number, kind) in LLAMA_CPP_FIELDS.items():
        assert (fields[name].number, fields[name].type) == (number, _TYPES[kind]), name
    fields = pb.PredictOptions.DESCRIPTOR.fields_by_name
    for name, (number, kind, repeated) in PREDICT_FIELDS.items():
        f = fields[name]
        assert (f.number, f.type, f.is_repeated) == (
            number,
            _TYPES[kind],
            repeated,
        ), name


def test_every_field_has_one_decision_in_the_table_and_the_docs():
    assert set(gs.FIELDS) == set(LLAMA_CPP_FIELDS)
    doc = (ROOT / "docs" / "model-settings.md").read_text()
    assert "docs/model-settings.md" in (ROOT / "README.md").read_text()
    for name, (decision, why) in gs.FIELDS.items():
        assert decision in (gs.MAPPED, gs.IGNORED)
        assert why
        assert re.search(rf"^\| `{name}` \|", doc, re.M), (
            f"{name} missing from docs/model-settings.md"
        )


# ---- KV cache type ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("fp8", "fp8", "fp8"),
        ("fp8_e5m2", "", "fp8_e5m2"),
        ("", "fp8_e4m3", "fp8_e4m3"),
        ("f16", "float16", "float16"),
        ("BF16", "", "bfloat16"),
        ("auto", "auto", "auto"),
    ],
)
def test_cache_types_map_to_kv_cache_dtype(key, value, expected):
    got = settings(CacheTypeKey=key, CacheTypeValue=value)
    assert got.engine_kwargs == {"kv_cache_dtype": expected}
    assert got.notes == []


@pytest.mark.parametrize(("field", "value"), [("CacheTypeKey", "q4_0"), ("CacheTypeValue", "q8_0")])
def test_a_llama_cpp_quantized_cache_type_fails_naming_the_field_and_vllms_choices(field, value):
    with pytest.raises(InvalidArgument) as e:
        settings(**{field: value})
    message = e.value.message
    assert field in message and repr(value) in message
    for choice in ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"):
        assert choice in message


def test_different_key_and_value_types_fail_vllm_has_one_type_for_both():
    with pytest.raises(InvalidArgument, match="CacheTypeKey and CacheTypeValue differ"):
        settings(CacheTypeKey="fp8", CacheTypeValue="auto")


# ---- RoPE ---------------------------------------------------------------------------------


def test_rope_fields_become_a_rope_request():
    got = settings(RopeScaling="Linear", RopeFreqScale=0.5, RopeFreqBase=20000)
    assert got.rope == gs.RopeRequest(rope_type="linear", factor=2.0, theta=20000.0)
    yarn = settings(
        RopeScaling="yarn", RopeFreqScale=0.25, YarnAttnFactor=1.0, YarnBetaFast=16, YarnBetaSlow=2
    ).rope
    assert yarn == gs.RopeRequest("yarn", 4.0, None, 1.0, 16.0, 2.0)
    assert settings(RopeScaling="none").rope == gs.RopeRequest(rope_type="default")
    assert settings().rope is None


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"RopeScaling": "dynamic-ntk"}, "RopeScaling 'dynamic-ntk' is not one"),
        ({"RopeScaling": "yarn"}, "needs RopeFreqScale"),
        ({"RopeFreqScale": -1.0}, "RopeFreqScale must be a positive number"),
        ({"RopeFreqBase": math.inf}, "RopeFreqBase must be a positive number"),
        ({"RopeScaling": "yarn", "RopeFreqScale": 0.5, "YarnBetaFast": -3}, "YarnBetaFast"),
    ],
)
def test_rope_values_vllm_cannot_take_fail_naming_the_field(fields, words):
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        settings(**fields)


def test_yarn_ext_factor_is_ignored_with_its_reason_unless_it_is_vllms_own():
    assert settings(YarnExtFactor=1.0).notes == []
    (note,) = settings(YarnExtFactor=0.5).notes
    assert note.startswith("YarnExtFactor=0.5: vLLM's YaRN always blends in extrapolation")


QWEN_OWN = {"rope_theta": 10000.0, "rope_type": "default"}


def test_linear_scaling_merges_into_the_models_own_parameters():
    overrides, notes = gs.resolve_rope(
        gs.RopeRequest(rope_type="linear", factor=2.0, theta=20000.0), QWEN_OWN, 4096
    )
    assert overrides == {
        "rope_parameters": {"rope_theta": 20000.0, "rope_type": "linear", "factor": 2.0}
    }
    assert notes == []


def test_yarn_sets_the_original_length_and_extends_max_position_embeddings():
    overrides, notes = gs.resolve_rope(
        gs.RopeRequest("yarn", 4.0, None, 1.0, 16.0, 2.0),
        {**QWEN_OWN, "partial_rotary_factor": 0.5},
        4096,
    )
    assert overrides["max_position_embeddings"] == 16384
    assert overrides["rope_parameters"] == {
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 4096,
        "attention_factor": pytest.approx(0.1 * math.log(4.0) + 1.0),
        "beta_fast": 16.0,
        "beta_slow": 2.0,
    }
    assert notes == []


def test_a_scale_alone_keeps_a_yarn_models_own_type_and_original_length():
    own = {
        "rope_theta": 1e6,
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
        "beta_fast": 32.0,
    }
    overrides, _ = gs.resolve_rope(gs.RopeRequest(factor=2.0), own, 131072)
    assert overrides["rope_parameters"]["rope_type"] == "yarn"
    assert overrides["rope_parameters"]["beta_fast"] == 32.0
    assert overrides["max_position_embeddings"] == 65536


def test_none_turns_a_models_scaling_off_and_yarn_only_fields_are_noted():
    own = {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0}
    overrides, notes = gs.resolve_rope(
        gs.RopeRequest(rope_type="default", beta_fast=8.0), own, 131072
    )
    assert overrides == {"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}
    assert notes == ["YarnBetaFast=8: only used with YaRN"]


def test_per_layer_type_parameters_get_the_change_each():
    own = {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    }
    overrides, _ = gs.resolve_rope(gs.RopeRequest(factor=2.0), own, 8192)
    params = overrides["rope_parameters"]
    assert params["full_attention"] == {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}
    assert params["sliding_attention"]["factor"] == 2.0


# ---- Threads ------------------------------------------------------------------------------


def test_threads_on_cpu_are_kept_for_the_engine_start_and_ignored_on_gpu(monkeypatch):
    monkeypatch.delenv(gs.THREADS_ENV, raising=False)
    assert settings(Threads=2).threads == 2
    gpu = settings(cpu=False, Threads=8)
    assert gpu.threads == 0
    assert gpu.notes == ["Threads=8: on GPU the GPU computes; vLLM sizes its CPU threads itself"]


def test_an_operators_binding_in_the_environment_wins_over_threads(monkeypatch):
    monkeypatch.setenv(gs.THREADS_ENV, "0-3")
    got = settings(Threads=2)
    assert got.threads == 0
    assert "VLLM_CPU_OMP_THREADS_BIND='0-3' is set" in got.notes[0]


SMT = [(0, 0), (1, 1), (2, 0), (3, 1)]  # 2 cores, 2 threads each: 0/2 and 1/3 are siblings
TWO = [(0, 0), (1, 1)]


@pytest.mark.parametrize(
    ("threads", "cpus", "ranks", "reserved", "bind", "noted"),
    [
        (1, TWO, 1, 1, "0", False),
        (2, TWO, 1, 1, "0", True),  # vLLM keeps one CPU for its scheduler and the worker
        (2, TWO, 1, 0, "0,1", False),  # unless VLLM_CPU_NUM_OF_RESERVED_CPU=0
        (2, SMT, 1, 1, "0,1", False),  # one CPU per physical core first
        (3, SMT, 1, 1, "0,1,2", False),
        (4, SMT, 1, 1, "0,1,2", True),
        (4, SMT, 2, 0, "0,1|2,3", False),
        (8, TWO, 1, 0, "0,1", True),  # more than the machine has
        (3, SMT, 2, 2, "0|1", True),
        (1, [(0, 0)], 1, 1, "0", False),  # one CPU: shared, as vLLM does
    ],
)
def test_thread_binding(threads, cpus, ranks, reserved, bind, noted):
    got, note = gs.thread_binding(threads, cpus, ranks, reserved)
    assert got == bind
    assert (note is not None) == noted


# ---- GPU placement and the llama.cpp-only rest --------------------------------------------


def test_main_gpu_selects_the_device_of_a_one_gpu_engine_only():
    assert settings(cpu=False, MainGPU="1").engine_kwargs == {"device_ids": [1]}
    assert settings(cpu=False, MainGPU="GPU-3f2a").engine_kwargs == {"device_ids": ["GPU-3f2a"]}
    tp = settings(cpu=False, MainGPU="1", TensorParallelSize=2)
    assert tp.engine_kwargs == {} and "engine of 2 GPUs" in tp.notes[0]
    on_cpu = settings(MainGPU="0")
    assert on_cpu.engine_kwargs == {} and on_cpu.notes == ["MainGPU=0: this vLLM runs on CPU"]
    with pytest.raises(InvalidArgument, match="MainGPU 'first'"):
        settings(cpu=False, MainGPU="first")


IGNORED = dict(
    TensorSplit="3,1",
    NGPULayers=99,
    LowVRAM=True,
    MMap=True,
    MLock=True,
    NUMA=True,
    FlashAttention="on",
    NoKVOffload=True,
)


@pytest.mark.parametrize("cpu", [True, False])
def test_llama_cpp_only_fields_are_never_an_error_and_each_is_noted_with_its_reason(cpu):
    got = settings(cpu=cpu, **IGNORED)
    assert got.engine_kwargs == {} and got.rope is None and got.threads == 0
    assert len(got.notes) == len(IGNORED)
    for name, note in zip(IGNORED, got.notes, strict=True):
        assert note.startswith(f"{name}=") and note.endswith(gs.FIELDS[name][1])


def test_load_plan_carries_the_mappings_and_logs_the_ignored_once(caplog, monkeypatch):
    monkeypatch.delenv(gs.THREADS_ENV, raising=False)
    caplog.set_level("INFO", logger="backend.load_options")
    plan = build_load_plan(
        pb.ModelOptions(
            Model="m",
            CacheTypeKey="fp8",
            RopeFreqBase=5e5,
            Threads=2,
            MMap=True,
            Options=["--kv-cache-dtype:auto"],  # a later layer still wins
        ),
        flag_parser(),
        cpu=True,
    )
    assert plan.engine_kwargs["kv_cache_dtype"] == "auto"
    assert plan.rope == gs.RopeRequest(theta=5e5)
    assert plan.threads == 2
    lines = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert lines == [
        f"LoadModel: settings accepted and not used: MMap=True: {gs.FIELDS['MMap'][1]}"
    ]
