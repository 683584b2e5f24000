"""`import-command`: real `vllm serve` commands → gateway YAML → the same engine.

The proof is the round trip: the printed YAML is loaded, turned into what the
gateway sends in LoadModel (`gateway_model_options`), run through
`build_load_plan` with vLLM's real flag parser, and the engine arguments that
come out must equal what vLLM's own `vllm serve` parser gives for the original
command.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import random
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from backend import import_command as ic
from backend import vllm_flags  # needs vLLM: tests/unit runs in the installed venv
from backend.import_flags import LEGACY_FLAGS, SERVER_FLAGS, arity_of
from backend.load_options import build_load_plan
from tests.unit.fakes import FakeModelOptions

ROOT = Path(__file__).resolve().parents[2]

# Top-level keys of LocalAI's ModelConfig / LLMConfig (core/config/model_config.go)
# the converter may write: a key the gateway does not know would be silently ignored.
LOCALAI_KEYS = {
    "name", "backend", "parameters", "context_size", "max_model_len",
    "gpu_memory_utilization", "dtype", "quantization", "load_format",
    "trust_remote_code", "enforce_eager", "tensor_parallel_size", "swap_space",
    "disable_log_stats", "limit_mm_per_prompt", "template", "chat_template_kwargs",
    "options", "engine_args", "env",
}  # fmt: skip

NO_CONTEXT = {"max_model_len": None}  # what a command without --max-model-len adds


@pytest.fixture(scope="module")
def parser():
    return vllm_flags.flag_parser()


@pytest.fixture(scope="module")
def serve_parser():
    """`vllm serve`'s own argument parser, defaults suppressed: only given flags come back."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = make_arg_parser(FlexibleArgumentParser(add_help=False))
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return p


def _float32(x: float) -> float:
    return float(struct.unpack("f", struct.pack("f", x))[0])


def gateway_model_options(cfg: dict[str, Any]) -> FakeModelOptions:
    """What the gateway sends in LoadModel for a model config.

    LocalAI's `grpcModelOpts` (core/backend/options.go) for the keys this worker
    reads, with its quirks: ContextSize is 4096 when `context_size` is unset,
    GPUMemoryUtilization is a float32, `engine_args` travels as a JSON string,
    and Seed is random when `parameters.seed` is unset.
    """
    mm = cfg.get("limit_mm_per_prompt", {})
    return FakeModelOptions(
        Model=cfg["parameters"]["model"],
        ContextSize=cfg.get("context_size") or 4096,
        MaxModelLen=cfg.get("max_model_len", 0),
        Seed=cfg["parameters"].get("seed") or random.randint(1, 2**31 - 1),
        DType=cfg.get("dtype", ""),
        Quantization=cfg.get("quantization", ""),
        LoadFormat=cfg.get("load_format", ""),
        Tokenizer=cfg["parameters"].get("tokenizer", ""),
        GPUMemoryUtilization=_float32(cfg.get("gpu_memory_utilization", 0.0)),
        TrustRemoteCode=cfg.get("trust_remote_code", False),
        EnforceEager=cfg.get("enforce_eager", False),
        SwapSpace=cfg.get("swap_space", 0),
        TensorParallelSize=cfg.get("tensor_parallel_size", 0),
        DisableLogStatus=cfg.get("disable_log_stats", False),
        LimitImagePerPrompt=mm.get("image", 0),
        LimitVideoPerPrompt=mm.get("video", 0),
        LimitAudioPerPrompt=mm.get("audio", 0),
        Options=list(cfg.get("options", [])),
        EngineArgs=json.dumps(cfg["engine_args"]) if cfg.get("engine_args") else "",
    )


def serve_argv(command: str) -> list[str]:
    """The words `vllm serve` itself parses: after `serve` or the server module."""
    words = shlex.split(re.sub(r"\\\s*\n", " ", command))
    for marker in ("serve", "vllm.entrypoints.openai.api_server"):
        if marker in words:
            return words[words.index(marker) + 1 :]
    return words


def _defaults() -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(vllm_flags.AsyncEngineArgs):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def effective(kwargs: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Engine kwargs minus those equal to vLLM's default: absent and default are the same."""
    out = {k: v for k, v in kwargs.items() if k == "model" or k not in defaults or v != defaults[k]}
    if "gpu_memory_utilization" in out:  # the gateway's field is a float32
        out["gpu_memory_utilization"] = round(out["gpu_memory_utilization"], 6)
    return out


# (id, command, expected YAML keys). Commands are as their projects document them.
CASES = [
    (
        "qwen3-reasoning-tools",
        "vllm serve Qwen/Qwen3-8B --enable-auto-tool-choice --tool-call-parser hermes "
        "--reasoning-parser qwen3 --max-model-len 32768 --gpu-memory-utilization 0.85 "
        "--host 0.0.0.0 --port 8000",
        {
            "name": "Qwen3-8B",
            "context_size": 32768,
            "gpu_memory_utilization": 0.85,
            "options": ["tool_parser:hermes", "reasoning_parser:qwen3"],
            "engine_args": None,
        },
    ),
    (
        "llama3.1-json-tools",
        "vllm serve meta-llama/Llama-3.1-8B-Instruct --enable-auto-tool-choice "
        "--tool-call-parser llama3_json "
        "--chat-template examples/tool_chat_template_llama3.1_json.jinja "
        "--max-model-len 8192 --dtype bfloat16",
        {
            "context_size": 8192,
            "dtype": "bfloat16",
            "options": [
                "tool_parser:llama3_json",
                "chat_template:examples/tool_chat_template_llama3.1_json.jinja",
            ],
        },
    ),
    (
        "mistral-tokenizer-mode",
        "vllm serve mistralai/Mistral-7B-Instruct-v0.3 --tokenizer-mode mistral "
        "--config-format mistral --load-format mistral --enable-auto-tool-choice "
        "--tool-call-parser mistral",
        {
            "load_format": "mistral",
            "options": ["tool_parser:mistral"],
            "engine_args": {"tokenizer_mode": "mistral", "config_format": "mistral", **NO_CONTEXT},
        },
    ),
    (
        "deepseek-r1-distill",
        "vllm serve deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --reasoning-parser deepseek_r1 "
        "--max-model-len 32k --enforce-eager --trust-remote-code",
        {
            "context_size": 32000,  # vLLM: k = 1000, K = 1024
            "enforce_eager": True,
            "trust_remote_code": True,
            "options": ["reasoning_parser:deepseek_r1"],
        },
    ),
    (
        "gpt-oss",
        "vllm serve openai/gpt-oss-20b --tool-call-parser openai --enable-auto-tool-choice "
        "--reasoning-parser openai_gptoss --async-scheduling --max-num-batched-tokens 8192",
        {
            "name": "gpt-oss-20b",
            "options": ["tool_parser:openai", "reasoning_parser:openai_gptoss"],
            "engine_args": {
                "async_scheduling": True,
                "max_num_batched_tokens": 8192,
                **NO_CONTEXT,
            },
        },
    ),
    (
        "awq-quantized",
        "vllm serve TheBloke/Mistral-7B-Instruct-v0.2-AWQ -q awq --dtype half "
        "--max-model-len 4096 --gpu-memory-utilization=0.9 "
        "--tokenizer mistralai/Mistral-7B-Instruct-v0.2",
        {
            "parameters": {
                "model": "TheBloke/Mistral-7B-Instruct-v0.2-AWQ",
                "tokenizer": "mistralai/Mistral-7B-Instruct-v0.2",
            },
            "quantization": "awq",
            "dtype": "half",
            "gpu_memory_utilization": 0.9,
        },
    ),
    (
        "tensor-parallel",
        "vllm serve meta-llama/Llama-3.3-70B-Instruct --tensor-parallel-size 4 "
        "--pipeline-parallel-size 2 --distributed-executor-backend mp --max-model-len 65536",
        {
            "tensor_parallel_size": 4,
            "engine_args": {"pipeline_parallel_size": 2, "distributed_executor_backend": "mp"},
        },
    ),
    (
        "speculative-ngram",
        "vllm serve meta-llama/Llama-3.1-8B-Instruct --speculative-config "
        '\'{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}\' '
        "--max-model-len 8192",
        {
            "engine_args": {
                "speculative_config": {
                    "method": "ngram",
                    "num_speculative_tokens": 5,
                    "prompt_lookup_max": 4,
                }
            }
        },
    ),
    (
        "lora",
        "vllm serve meta-llama/Llama-2-7b-hf --enable-lora --lora-modules "
        "sql-lora=jeeves/llama-2-7b-sql-lora-test other=/adapters/other "
        "--max-lora-rank 64 --max-loras 2",
        {"engine_args": {"enable_lora": True, "max_lora_rank": 64, "max_loras": 2, **NO_CONTEXT}},
    ),
    (
        "prefix-caching-served-name",
        "vllm serve Qwen/Qwen2.5-7B-Instruct --enable-prefix-caching "
        "--no-enable-chunked-prefill --max-num-seqs 64 --served-model-name qwen2.5",
        {
            "name": "qwen2.5",
            "engine_args": {
                "enable_prefix_caching": True,
                "enable_chunked_prefill": False,
                "max_num_seqs": 64,
                **NO_CONTEXT,
            },
        },
    ),
    (
        "hf-overrides-yarn",
        "vllm serve Qwen/Qwen2.5-7B-Instruct --hf-overrides "
        '\'{"rope_scaling": {"rope_type": "yarn", "factor": 4.0, '
        '"original_max_position_embeddings": 32768}}\' --max-model-len 131072',
        {
            "context_size": 131072,
            "engine_args": {
                "hf_overrides": {
                    "rope_scaling": {
                        "rope_type": "yarn",
                        "factor": 4.0,
                        "original_max_position_embeddings": 32768,
                    }
                }
            },
        },
    ),
    (
        "multi-line-vision",
        """CUDA_VISIBLE_DEVICES=0,1 vllm serve Qwen/Qwen2.5-VL-7B-Instruct \\
            --tensor-parallel-size=2 \\
            --limit-mm-per-prompt '{"image": 4, "video": 1}' \\
            --trust-remote-code \\
            --kv-cache-memory-bytes 4G \\
            --api-key sk-secret-value""",
        {
            "tensor_parallel_size": 2,
            "limit_mm_per_prompt": {"image": 4, "video": 1},
            "trust_remote_code": True,
            "engine_args": {"kv_cache_memory_bytes": 4 * 2**30, **NO_CONTEXT},
            "env": {"CUDA_VISIBLE_DEVICES": "0,1"},
        },
    ),
    (
        "openai-api-server-module",
        "python -m vllm.entrypoints.openai.api_server --model facebook/opt-125m "
        "--dtype float32 --seed 42 --port 8080 --disable-log-stats",
        {
            "name": "opt-125m",
            "dtype": "float32",
            "disable_log_stats": True,
            # Not parameters.seed: that would also fix every request's sampling seed.
            "engine_args": {"seed": 42, **NO_CONTEXT},
        },
    ),
    (
        "bare-flags-no-executable",
        "Qwen/Qwen3-0.6B --enforce-eager --no-enable-prefix-caching --trust-remote-code "
        "--no-async-scheduling",
        {
            "enforce_eager": True,
            "trust_remote_code": True,
            "engine_args": {
                "enable_prefix_caching": False,
                "async_scheduling": False,
                **NO_CONTEXT,
            },
        },
    ),
    (
        "cli-spellings",
        "/usr/local/bin/vllm serve --model=Qwen/Qwen3-0.6B --max_num_seqs=4 -O0 "
        "-cc.cudagraph_mode=NONE --max-model-len auto",
        {
            # vLLM expands a compilation config into every field: the worker's
            # parser does the same from the pasted flag.
            "options": ['--compilation-config={"cudagraph_mode": "NONE"}'],
            "engine_args": {"max_num_seqs": 4, "optimization_level": "0", "max_model_len": -1},
        },
    ),
    (
        "structured-outputs-chat-kwargs-plugin",
        'vllm serve Qwen/Qwen3-8B --structured-outputs-config \'{"backend": "xgrammar"}\' '
        "--default-chat-template-kwargs '{\"enable_thinking\": false}' "
        "--generation-config vllm --override-generation-config '{\"temperature\": 0.6}' "
        "--tool-parser-plugin /plugins/my_parser.py --tool-call-parser my_parser",
        {
            "chat_template_kwargs": {"enable_thinking": False},
            "options": [
                "tool_parser:my_parser",
                "tool_parser_plugin:/plugins/my_parser.py",
                '--structured-outputs-config={"backend": "xgrammar"}',
            ],
            "engine_args": {
                "generation_config": "vllm",
                "override_generation_config": {"temperature": 0.6},
                **NO_CONTEXT,
            },
        },
    ),
    (
        "run-sh-with-prompt",
        "$ ./run.sh serve Qwen/Qwen3-0.6B --dtype float32 "
        "--kv-cache-memory-bytes 1073741824 --enforce-eager",
        {
            "dtype": "float32",
            "enforce_eager": True,
            "engine_args": {"kv_cache_memory_bytes": 1073741824, **NO_CONTEXT},
        },
    ),
    (
        "deepseek-v3-short-aliases",
        "vllm serve deepseek-ai/DeepSeek-V3 -tp 8 -ep -dp 2 --trust-remote-code "
        "--reasoning-parser deepseek_v3 --tool-call-parser deepseek_v3 --enable-auto-tool-choice",
        {
            "tensor_parallel_size": 8,
            "options": ["tool_parser:deepseek_v3", "reasoning_parser:deepseek_v3"],
            "engine_args": {
                "enable_expert_parallel": True,
                "data_parallel_size": 2,
                **NO_CONTEXT,
            },
        },
    ),
]


@pytest.mark.parametrize(("command", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_yaml_has_the_expected_gateway_keys(parser, command, expected):
    cfg = yaml.safe_load(ic.convert(command, parser).to_yaml())
    assert set(cfg) <= LOCALAI_KEYS
    assert cfg["backend"] == "vllm"
    assert cfg["template"] == {"use_tokenizer_template": True}
    for key, value in expected.items():
        assert cfg.get(key) == value, key


@pytest.mark.parametrize("command", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_round_trip_gives_the_engine_vllm_serve_would_build(parser, serve_parser, command):
    text = ic.convert(command, parser).to_yaml()
    cfg = yaml.safe_load(text)
    plan = build_load_plan(gateway_model_options(cfg), parser)

    given = vars(serve_parser.parse_args(serve_argv(command)))
    model = given.pop("model_tag", None) or given.pop("model")
    expected = {"model": model, **{k: v for k, v in given.items() if k in parser.field_names}}
    # `--served-model-name` becomes the gateway's model name.
    assert cfg["name"] == expected.pop("served_model_name", [cfg["name"]])[0]
    actual = dict(plan.engine_kwargs)
    if "seed" not in expected:
        actual.pop("seed")  # the gateway's random seed (vllm serve's default is 0)
    defaults = _defaults()
    assert effective(actual, defaults) == effective(expected, defaults)

    # The server-side flags the worker honours.
    assert plan.settings.tool_parser == given.get("tool_call_parser")
    assert plan.settings.chat_template == given.get("chat_template")
    assert plan.settings.tool_parser_plugin == given.get("tool_parser_plugin")
    assert cfg.get("chat_template_kwargs") == given.get("default_chat_template_kwargs")


def test_dropped_server_flags_are_commented_and_secrets_are_not_copied(parser):
    text = ic.convert(CASES[11][1], parser).to_yaml()  # multi-line-vision: has --api-key
    assert "sk-secret-value" not in text
    assert "# dropped --api-key: the gateway authenticates clients" in text
    text = ic.convert(CASES[0][1], parser).to_yaml()
    assert "# dropped --host, --port: vLLM's HTTP server" in text
    assert "# dropped --enable-auto-tool-choice: implied" in text
    assert "# dropped --lora-modules" in ic.convert(CASES[8][1], parser).to_yaml()


def test_without_max_model_len_the_gateway_default_context_is_overridden(parser):
    cfg = ic.convert("vllm serve Qwen/Qwen3-0.6B", parser)
    assert cfg.engine_args == {"max_model_len": None}
    plan = build_load_plan(gateway_model_options(yaml.safe_load(cfg.to_yaml())), parser)
    assert plan.engine_kwargs["max_model_len"] is None  # not the gateway's 4096


def test_legacy_swap_space_is_kept_for_the_gateway_and_noted(parser):
    cfg = ic.convert("vllm serve m --swap-space 4 --disable-log-requests", parser)
    assert cfg.typed == {"swap_space": 4}
    notes = "\n".join(cfg.notes)
    assert "swap_space is ignored" in notes and "dropped --disable-log-requests" in notes
    plan = build_load_plan(gateway_model_options(yaml.safe_load(cfg.to_yaml())), parser)
    assert "swap_space" not in plan.engine_kwargs
    assert any("SwapSpace" in w for w in plan.warnings)


def test_words_already_split_are_not_split_again(parser):
    words = ["vllm", "serve", "m", "--chat-template", "{{ 'a b' }}", "--max-model-len", "512"]
    cfg = ic.convert(words, parser)
    assert cfg.options == ["chat_template:{{ 'a b' }}"]
    assert cfg.typed == {"context_size": 512}


def test_absolute_model_path_is_noted(parser):
    cfg = ic.convert("vllm serve /models/llama-3.1-8b/ --max-model-len 512", parser)
    assert cfg.name == "llama-3.1-8b"
    assert any("absolute" in n for n in cfg.notes)


@pytest.mark.parametrize(
    ("command", "fragments"),
    [
        ("vllm serve m --max-num-seq 8", ["--max-num-seq", "'--max-num-seqs'"]),
        ("vllm serve m --hostt 0.0.0.0", ["--hostt", "'--host'"]),
        ("vllm serve m --bogus.key 1", ["unknown flag --bogus"]),
        ("vllm serve m --max-num-seqs eight", ["--max-num-seqs", "eight"]),
        ("vllm serve m --dtype float13", ["--dtype", "float13"]),
        ("vllm serve m --enforce-eager=maybe", ["--enforce-eager", "maybe"]),
        ("vllm serve m --max-model-len", ["--max-model-len needs a value"]),
        ("vllm serve --port 8000", ["no model"]),
        ("vllm serve a b", ["'b'", "already 'a'"]),
        ("vllm serve m --config serve.yaml", ["--config"]),
        ("vllm serve m --chat-template 'x", ["quotes"]),
        ("vllm serve m --default-chat-template-kwargs yes", ["JSON object"]),
        ("vllm serve m --swap-space lots", ["--swap-space", "lots"]),
        ("python -m mypkg.server --model m", ["python -m mypkg.server"]),
    ],
)
def test_bad_commands_exit_2_naming_the_flag(parser, capsys, command, fragments):
    assert ic.main([command]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    for fragment in fragments:
        assert fragment in captured.err


def test_server_flag_table_matches_vllm_serve(parser, serve_parser):
    """Every `vllm serve` flag is an engine flag or classified, with vLLM's arity."""
    serve_options = {}
    for action in serve_parser._actions:
        for option in action.option_strings:
            serve_options[option] = action
    for option, action in serve_options.items():
        if option in parser._actions:
            continue
        listed = SERVER_FLAGS.get(option)
        if listed is None and option.startswith("--no-"):
            listed = SERVER_FLAGS.get("--" + option[5:])
        assert listed is not None, f"vllm serve has {option}: map it or say why it is dropped"
        assert listed[0] == arity_of(action), option
    assert set(SERVER_FLAGS) <= set(serve_options)
    assert not set(LEGACY_FLAGS) & set(serve_options), "a legacy flag is back in vLLM"


def test_stdin_and_double_dash_forms(parser, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("vllm serve m \\\n  --max-model-len 64\n"))
    assert ic.main(["-"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["context_size"] == 64
    assert ic.main(["--", "vllm", "serve", "m", "--max-model-len", "128"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["context_size"] == 128


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "backend", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_python_m_backend_dispatches_import_command():
    # Only server flags: no engine flag to check, so vLLM is not even imported.
    done = _run("import-command", "vllm serve Qwen/Qwen3-0.6B --host 0.0.0.0 --port 9000")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["parameters"] == {"model": "Qwen/Qwen3-0.6B"}
    bad = _run("import-command", "vllm serve m --chat-template 'x")
    assert bad.returncode == 2
    assert "quotes" in bad.stderr
    assert _run("--help").stdout.count("--addr") >= 1  # the worker's own CLI is intact


def test_module_imports_no_vllm():
    code = "import sys, backend.import_command; print('vllm' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"
