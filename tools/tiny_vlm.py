"""Build tiny, deterministic vision-language models for tests (no network).

Each kind is a real Hugging Face model directory: the architecture's own
transformers model class with random weights (fixed seed, float32), saved by
``save_pretrained`` in the layout vLLM loads, and the architecture's own
processor (transformers' processor and image-processor classes, with their
saved configs), so token counts and image handling are the model's and
vLLM's, exactly. The weights are meaningless; with greedy decoding the output
still depends deterministically on every pixel, which is what tests check.

Kinds:

* ``paddleocr`` -- ``PaddleOCRVLForConditionalGeneration`` (SigLIP-style
  NaViT vision tower, 2 layers, hidden 64; Ernie-4.5 text model, 2 layers,
  hidden 128). vLLM 0.32's module and transformers' PIL image processor
  import without torchvision, so it loads in the CPU profile here. Images
  only (vLLM registers no video for it).
* ``qwen2vl`` -- ``Qwen2VLForConditionalGeneration`` (images and video).
  Its vLLM module imports transformers' torchvision image processor, so it
  loads only where torchvision matching torch is installed; the directory
  builds anywhere (its processor files are written as the hub's are, because
  instantiating Qwen2-VL's video processor needs torchvision).

The text tokenizer is :mod:`tools.tiny_model`'s byte-level BPE plus each
model's own special tokens. Usage::

    from tools.tiny_vlm import build_tiny_vlm, default_vlm_dir
    model_dir = build_tiny_vlm(default_vlm_dir("paddleocr"), "paddleocr")

    python -m tools.tiny_vlm {paddleocr|qwen2vl} [DIR] [--force]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tools import tiny_model as _tm

__all__ = ["FORMAT_VERSION", "KINDS", "build_tiny_vlm", "default_vlm_dir", "main"]

# Bump when the produced artefacts change in a way the source hashes would
# not reflect (e.g. to force a rebuild after a library upgrade).
FORMAT_VERSION = 1
STAMP_FILE = ".tiny_vlm_stamp.json"
SEEDS = {"paddleocr": 2027, "qwen2vl": 2029}
KINDS = tuple(SEEDS)

# The text model: the size of tools/tiny_model's (head_dim 32: vLLM's CPU
# attention rejects 16). mrope_section splits head_dim/2 = 16 rotary pairs
# into (temporal, height, width), as Qwen2-VL's [16, 24, 24] does for 64.
TEXT = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=8192,
)
MROPE_SECTION = [4, 6, 6]

# Both processors resize an image to a multiple of 28 (14-pixel patches,
# 2x2 merged into one token) between these pixel counts: 224x224 -> 64
# tokens, 448x448 -> 256, 896x896 -> 1024 (the most; larger images are
# scaled down to it, so one image always fits a 2048-token context).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 896 * 896

# PaddleOCR-VL's chat template (a user turn's images first, then its text),
# also taking plain-string content. It loops over message['content'] as the
# real one does: that is how vLLM detects the "openai" content format and
# leaves placing the image placeholders to the template.
PADDLE_TEMPLATE = (
    "{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = true -%}"
    "{%- endif -%}{{- '<|begin_of_sentence|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'User: ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'Assistant: ' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for content in message['content'] -%}{%- if content['type'] == 'image' -%}"
    "{{- '<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>' -}}{%- endif -%}{%- endfor -%}"
    "{%- for content in message['content'] -%}{%- if content['type'] == 'text' -%}"
    "{{- content['text'] -}}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '<|end_of_sentence|>' -}}"
    "{%- else -%}{{- '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)

# Qwen2-VL's own chat template, as its hub repository ships it.
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_vlm_dir(kind: str) -> Path:
    """``$TINY_VLM_DIR/<kind>`` if set, else ``<repo>/.cache/tiny-vlm-<kind>``."""
    env = os.environ.get("TINY_VLM_DIR")
    if env:
        return Path(env).expanduser().resolve() / kind
    return _repo_root() / ".cache" / f"tiny-vlm-{kind}"


def _expected_stamp(kind: str) -> dict[str, Any]:
    h = hashlib.sha256()
    for path in (Path(__file__), Path(_tm.__file__)):  # the tokenizer comes from tiny_model
        h.update(path.read_bytes())
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "source_sha256": h.hexdigest(),
        "transformers": _tm._transformers_version(),
    }


def _is_complete(model_dir: Path, kind: str) -> bool:
    try:
        stamp = json.loads((model_dir / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return stamp == _expected_stamp(kind) and (model_dir / "model.safetensors").is_file()


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def _tokenizer(extra: tuple[str, ...]) -> tuple[Any, dict[str, int]]:
    """tiny_model's BPE tokenizer plus `extra` special tokens (ids after its own)."""
    from tokenizers import AddedToken

    tok = _tm._build_tokenizer()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in extra]
    )
    names = [t for t, _ in _tm.ADDED_TOKENS] + list(extra)
    return tok, {t: tok.token_to_id(t) for t in names}


def _added_decoder(ids: dict[str, int], special: set[str]) -> dict[str, Any]:
    return {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in special,
        }
        for t, i in ids.items()
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def _save_model(model_cls: Any, config: Any, seed: int, target: Path) -> None:
    import torch

    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    model.save_pretrained(str(target), safe_serialization=True)


# --------------------------------------------------------------------------
# PaddleOCR-VL
# --------------------------------------------------------------------------

PADDLE_TOKENS = (
    "<|begin_of_sentence|>",
    "<|end_of_sentence|>",
    "<|IMAGE_START|>",
    "<|IMAGE_PLACEHOLDER|>",
    "<|IMAGE_END|>",
    "<|video_pad|>",
)


def _build_paddleocr(target: Path) -> None:
    from transformers import (
        PaddleOCRVLConfig,
        PaddleOCRVLForConditionalGeneration,
        PaddleOCRVLProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import (
        PaddleOCRVLImageProcessorPil,
    )

    tok, ids = _tokenizer(PADDLE_TOKENS)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    config = PaddleOCRVLConfig(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=14,
            image_size=224,
            spatial_merge_size=2,
        ),
        text_config=dict(
            vocab_size=vocab,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 500000.0,
                "mrope_section": MROPE_SECTION,
            },
            tie_word_embeddings=False,
            pad_token_id=ids["<|endoftext|>"],
            bos_token_id=ids["<|begin_of_sentence|>"],
            eos_token_id=ids["<|end_of_sentence|>"],
            **TEXT,
        ),
        image_token_id=ids["<|IMAGE_PLACEHOLDER|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|IMAGE_START|>"],
        vision_end_token_id=ids["<|IMAGE_END|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    _save_model(PaddleOCRVLForConditionalGeneration, config, SEEDS["paddleocr"], target)

    tok_file = target / "tokenizer.json"
    tok.save(str(tok_file))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_file),
        bos_token="<|begin_of_sentence|>",
        eos_token="<|end_of_sentence|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|IMAGE_PLACEHOLDER|>"},
        model_max_length=TEXT["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    image_processor = PaddleOCRVLImageProcessorPil(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    processor = PaddleOCRVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=PADDLE_TEMPLATE
    )
    processor.save_pretrained(str(target))
    _write_json(
        target / "generation_config.json",
        {
            "bos_token_id": ids["<|begin_of_sentence|>"],
            "eos_token_id": ids["<|end_of_sentence|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
    )


# --------------------------------------------------------------------------
# Qwen2-VL
# --------------------------------------------------------------------------

QWEN2VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def _build_qwen2vl(target: Path) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok, ids = _tokenizer(QWEN2VL_TOKENS)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=2,
            embed_dim=64,
            hidden_size=TEXT["hidden_size"],
            num_heads=2,
            mlp_ratio=2,
            in_chans=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        text_config=dict(
            vocab_size=vocab,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": MROPE_SECTION,
            },
            tie_word_embeddings=False,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            **{k: v for k, v in TEXT.items() if k != "head_dim"},
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    _save_model(Qwen2VLForConditionalGeneration, config, SEEDS["qwen2vl"], target)

    tok.save(str(target / "tokenizer.json"))
    special = {t for t, s in _tm.ADDED_TOKENS if s} | set(QWEN2VL_TOKENS)
    _write_json(
        target / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": _added_decoder(ids, special),
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": TEXT["max_position_embeddings"],
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    (target / "chat_template.jinja").write_text(QWEN2VL_TEMPLATE)
    # Written as the hub's Qwen2-VL files are: building the processor object
    # needs Qwen2-VL's video processor, which needs torchvision.
    common = {
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "processor_class": "Qwen2VLProcessor",
    }
    _write_json(
        target / "preprocessor_config.json",
        {**common, "image_processor_type": "Qwen2VLImageProcessor"},
    )
    _write_json(
        target / "video_preprocessor_config.json",
        {**common, "video_processor_type": "Qwen2VLVideoProcessor"},
    )
    _write_json(
        target / "generation_config.json",
        {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]},
    )


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "paddleocr": _build_paddleocr,
    "qwen2vl": _build_qwen2vl,
}


def build_tiny_vlm(out_dir: str | os.PathLike[str], kind: str, *, force: bool = False) -> Path:
    """Build the `kind` tiny VLM into ``out_dir`` (if needed) and return its path.

    Idempotent and safe between processes, like ``tools.tiny_model``: built in
    a sibling temp directory under a lock, renamed into place, reused while
    its stamp (sources, transformers version) matches.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny VLM kind {kind!r} (one of {', '.join(KINDS)})")

    def build(tmp: Path) -> None:
        _BUILDERS[kind](tmp)
        _write_json(tmp / STAMP_FILE, _expected_stamp(kind))

    return _tm.build_in_place(
        Path(out_dir),
        complete=lambda out: _is_complete(out, kind),
        build=build,
        what="tiny-vlm",
        stamp_file=STAMP_FILE,
        force=force,
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tools.tiny_vlm",
        description="Build a tiny test VLM (if needed) and print its directory.",
    )
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("dir", nargs="?", default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    out = args.dir or default_vlm_dir(args.kind)
    print(build_tiny_vlm(out, args.kind, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
