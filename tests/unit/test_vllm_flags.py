"""The real vLLM argument parser behind Options: coercion as `vllm serve` does it."""

import json

import pytest

from backend.errors import InvalidArgument
from backend.load_options import build_load_plan
from tests.unit.fakes import FakeModelOptions

engine = pytest.importorskip("backend.engine")


@pytest.fixture(scope="module")
def parser():
    return engine.flag_parser()


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
