"""The real vLLM argument parser behind Options: coercion as `vllm serve` does it."""

import json

import pytest

from backend import vllm_flags  # needs vLLM: tests/unit runs in the installed venv
from backend.errors import InvalidArgument
from backend.load_options import build_load_plan
from tests.unit.fakes import FakeModelOptions


@pytest.fixture(scope="module")
def parser():
    return vllm_flags.flag_parser()


def test_cli_flags_are_coerced_to_engine_types(parser):
    opts = FakeModelOptions(
        Options=[
            "--max-num-seqs:8",
            "--enable-prefix-caching",
            "enforce_eager:false",
            '--hf-overrides={"rope_theta": 1000}',
            "max_model_len=512",
            "--dtype:float32",
            "--no-enable-chunked-prefill",
        ]
    )
    kw = build_load_plan(opts, parser).engine_kwargs
    assert kw["max_num_seqs"] == 8
    assert kw["enable_prefix_caching"] is True
    assert kw["enforce_eager"] is False
    assert kw["hf_overrides"] == {"rope_theta": 1000}
    assert kw["max_model_len"] == 512
    assert kw["dtype"] == "float32"
    assert kw["enable_chunked_prefill"] is False


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("--max-num-seqs:eight", "max-num-seqs"),
        ("--dtype:float13", "dtype"),
        ("--enforce-eager:maybe", "switch"),
        ("--max-num-seqs:", "needs a value"),
    ],
)
def test_bad_values_name_the_flag(parser, entry, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        build_load_plan(FakeModelOptions(Options=[entry]), parser)


def test_engine_args_json_objects_are_coerced_like_cli_flags(parser):
    opts = FakeModelOptions(
        EngineArgs=json.dumps(
            {
                "structured_outputs_config": {"enable_in_reasoning": True},
                "max_num_seqs": 4,
                "enable_prefix_caching": False,
                "max_model_len": None,
            }
        )
    )
    kw = build_load_plan(opts, parser).engine_kwargs
    assert type(kw["structured_outputs_config"]).__name__ == "StructuredOutputsConfig"
    assert kw["structured_outputs_config"].enable_in_reasoning is True
    assert kw["max_num_seqs"] == 4 and kw["enable_prefix_caching"] is False
    assert kw["max_model_len"] is None


def test_distributed_settings_pass_straight_to_vllm(parser):
    opts = FakeModelOptions(
        TensorParallelSize=4,
        Options=["--pipeline-parallel-size:2", "--distributed-executor-backend:ray", "-dp=2"],
    )
    kw = build_load_plan(opts, parser).engine_kwargs
    assert kw["tensor_parallel_size"] == 4
    assert kw["pipeline_parallel_size"] == 2
    assert kw["distributed_executor_backend"] == "ray"
    assert kw["data_parallel_size"] == 2


def test_eager_mode_is_chosen_when_no_compiler_exists(monkeypatch):
    from backend import model

    plan = build_load_plan(FakeModelOptions(), vllm_flags.flag_parser())
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(model.shutil, "which", lambda name: None)
    model._eager_without_compiler(plan)
    assert plan.engine_kwargs["enforce_eager"] is True
    explicit = build_load_plan(
        FakeModelOptions(Options=["--enforce-eager:false"]), vllm_flags.flag_parser()
    )
    model._eager_without_compiler(explicit)
    assert explicit.engine_kwargs["enforce_eager"] is False
