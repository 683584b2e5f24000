import json

import pytest

from backend.errors import InvalidArgument
from backend.load_options import (
    build_load_plan,
    engine_args_layer,
    resolve_model,
    split_option,
)
from tests.unit.fakes import FakeModelOptions


class RecordingParser:
    """Stands in for vLLM's argparse: records flags, coerces digits to int."""

    field_names = frozenset(
        {
            "max_num_seqs",
            "enable_prefix_caching",
            "dtype",
            "max_model_len",
            "hf_overrides",
            "reasoning_parser",
            "seed",
        }
    )

    def option_for(self, key):
        return "--" + key.replace("_", "-") if key in self.field_names else None

    def parse(self, flags):
        out = {}
        for flag, value in flags:
            key = flag.lstrip("-").replace("-", "_")
            out[key] = True if value is None else (int(value) if value.isdigit() else value)
        return out


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("tool_parser:hermes", ("tool_parser", "hermes")),
        ("tool-parser:hermes", ("tool_parser", "hermes")),
        ("--max-num-seqs:8", ("max_num_seqs", "8")),
        ("--max-num-seqs=8", ("max_num_seqs", "8")),
        ("max_num_seqs:8", ("max_num_seqs", "8")),
        ("--enable-prefix-caching", ("enable_prefix_caching", None)),
        ('--hf-overrides={"a": 1}', ("hf_overrides", '{"a": 1}')),
        ('hf_overrides:{"a": {"b": 2}}', ("hf_overrides", '{"a": {"b": 2}}')),
        ("chat_template:{{ x }}=1", ("chat_template", "{{ x }}=1")),
    ],
)
def test_option_entries_split_like_the_gateway_and_cli_write_them(entry, expected):
    assert split_option(entry) == expected


@pytest.mark.parametrize("entry", ["tool_parser", "", ":x", "  "])
def test_option_entry_without_key_or_value_is_rejected(entry):
    with pytest.raises(InvalidArgument):
        split_option(entry)


def test_precedence_typed_then_options_then_engine_args():
    opts = FakeModelOptions(
        ContextSize=1024,
        DType="float32",
        Seed=5,
        Options=["--max-model-len:2048", "tool_parser:hermes", "reasoning_parser:qwen3"],
        EngineArgs='{"max_model_len": 4096, "max-num-seqs": 3}',
    )
    plan = build_load_plan(opts, RecordingParser())
    assert plan.engine_kwargs["max_model_len"] == 4096
    assert plan.engine_kwargs["max_num_seqs"] == 3
    assert plan.engine_kwargs["dtype"] == "float32"
    assert plan.engine_kwargs["seed"] == 5
    assert plan.settings.tool_parser == "hermes"
    assert plan.settings.reasoning_parser == "qwen3"
    # vLLM serve's --reasoning-parser also tells the engine (structured output
    # then starts after the reasoning): we do the same.
    assert plan.engine_kwargs["reasoning_parser"] == "qwen3"


def test_max_model_len_wins_over_context_size():
    plan = build_load_plan(FakeModelOptions(ContextSize=512, MaxModelLen=256), RecordingParser())
    assert plan.engine_kwargs["max_model_len"] == 256


def test_typed_fields_map_to_engine_args():
    opts = FakeModelOptions(
        GPUMemoryUtilization=0.2,
        TrustRemoteCode=True,
        EnforceEager=True,
        TensorParallelSize=2,
        Quantization="awq",
        LoadFormat="safetensors",
        Tokenizer="tok",
        DisableLogStatus=True,
        LimitImagePerPrompt=2,
        LimitAudioPerPrompt=1,
        SwapSpace=4,
    )
    plan = build_load_plan(opts, RecordingParser())
    kw = plan.engine_kwargs
    assert kw["gpu_memory_utilization"] == pytest.approx(0.2)
    assert kw["trust_remote_code"] is True and kw["enforce_eager"] is True
    assert kw["tensor_parallel_size"] == 2
    assert (kw["quantization"], kw["load_format"], kw["tokenizer"]) == ("awq", "safetensors", "tok")
    assert kw["disable_log_stats"] is True
    assert kw["limit_mm_per_prompt"] == {"image": 2, "audio": 1}
    assert any("SwapSpace" in w for w in plan.warnings)


def test_trust_remote_code_is_off_unless_asked():
    assert (
        "trust_remote_code"
        not in build_load_plan(FakeModelOptions(), RecordingParser()).engine_kwargs
    )


def test_unknown_option_names_the_closest_engine_argument():
    with pytest.raises(InvalidArgument, match="did you mean 'max_num_seqs'"):
        build_load_plan(FakeModelOptions(Options=["--max-num-seq:8"]), RecordingParser())


def test_unknown_engine_args_key_names_the_closest():
    with pytest.raises(InvalidArgument, match="did you mean 'max_model_len'"):
        engine_args_layer('{"max_modl_len": 5}', RecordingParser())


@pytest.mark.parametrize("raw", ["{", "[1]", '"x"'])
def test_engine_args_must_be_a_json_object(raw):
    with pytest.raises(InvalidArgument, match="EngineArgs"):
        engine_args_layer(raw, RecordingParser())


def test_none_parser_disables_the_automatic_choice():
    plan = build_load_plan(FakeModelOptions(Options=["tool_parser:none"]), RecordingParser())
    assert plan.settings.tool_parser == ""


def test_model_resolution_prefers_an_existing_local_directory(tmp_path):
    (tmp_path / "my-model").mkdir()
    opts = FakeModelOptions(Model="my-model", ModelPath=str(tmp_path))
    assert resolve_model(opts) == str(tmp_path / "my-model")
    opts = FakeModelOptions(
        Model="Qwen/Qwen3-0.6B",
        ModelPath=str(tmp_path),
        ModelFile=str(tmp_path / "Qwen/Qwen3-0.6B"),
    )
    assert resolve_model(opts) == "Qwen/Qwen3-0.6B"
    with pytest.raises(InvalidArgument, match="Model is empty"):
        resolve_model(FakeModelOptions(Model=""))


def test_overrides_become_hf_overrides():
    opts = FakeModelOptions(
        Overrides=["rope_theta=1000000", "use_cache=false", '{"a": {"b": 1}}', "name=x"]
    )
    assert build_load_plan(opts, RecordingParser()).engine_kwargs["hf_overrides"] == {
        "rope_theta": 1000000,
        "use_cache": False,
        "a": {"b": 1},
        "name": "x",
    }
    with pytest.raises(InvalidArgument, match="key=value"):
        build_load_plan(FakeModelOptions(Overrides=["novalue"]), RecordingParser())
    with pytest.raises(InvalidArgument, match="Overrides"):
        build_load_plan(FakeModelOptions(Overrides=["{bad"]), RecordingParser())


def test_draft_model_becomes_a_speculative_config():
    kw = build_load_plan(
        FakeModelOptions(DraftModel="/models/draft"), RecordingParser()
    ).engine_kwargs
    assert kw["speculative_config"] == {"model": "/models/draft", "num_speculative_tokens": 3}


def _adapter(path, rank):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 16}))
    return path


def test_lora_adapters_enable_lora_with_the_largest_rank(tmp_path):
    a = _adapter(tmp_path / "style", 8)
    b = _adapter(tmp_path / "facts", 16)
    opts = FakeModelOptions(
        LoraAdapter=str(a),
        LoraScale=0.5,
        LoraAdapters=["facts"],
        LoraScales=[2.0],
        ModelPath=str(tmp_path),
    )
    plan = build_load_plan(opts, RecordingParser())
    assert plan.engine_kwargs["enable_lora"] is True
    assert plan.engine_kwargs["max_lora_rank"] == 16 and plan.engine_kwargs["max_loras"] == 2
    assert [(x.name, x.path, x.scale) for x in plan.settings.lora_adapters] == [
        ("style", str(a), 0.5),
        ("facts", str(b), 2.0),
    ]
    with pytest.raises(InvalidArgument, match=r"adapter_config\.json"):
        build_load_plan(FakeModelOptions(LoraAdapter=str(tmp_path)), RecordingParser())
