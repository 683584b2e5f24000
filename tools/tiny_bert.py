"""Build tiny, deterministic BERT pooling models (embedding / reranker) for tests.

Two kinds, both randomly initialised (fixed seeds, so the numbers are
meaningless but reproducible) and both real Hugging Face model directories
that ``transformers`` and vLLM (``runner="pooling"``) load in seconds on CPU:

* ``embed`` -- ``BertModel`` encoder packaged like a sentence-transformers
  model: ``modules.json`` = Transformer -> Pooling (``1_Pooling/config.json``:
  **mean** pooling) -> Normalize.  vLLM reads this and serves the ``embed``
  task as ``L2-normalize(mean(last_hidden_state over all prompt tokens))``
  (``[CLS]`` and ``[SEP]`` included, like sentence-transformers).  The same
  vector from transformers::

      enc = tok(text, return_tensors="pt")
      h = AutoModel.from_pretrained(d)(**enc).last_hidden_state[0]
      vec = torch.nn.functional.normalize(h.mean(0), dim=-1)

* ``rerank`` -- ``BertForSequenceClassification`` cross-encoder with
  ``num_labels=1`` (CLS -> dense+tanh pooler -> linear classifier).
  ``config.json`` declares ``sentence_transformers.activation_fn =
  torch.nn.modules.activation.Sigmoid`` (vLLM's default for one label
  anyway), so vLLM's ``classify`` task / ``/rerank`` returns
  ``sigmoid(logit)`` where ``logit = model(**tok(query, doc)).logits[0, 0]``.
  The pair *must* be fed with its token type ids (segment B = 1): vLLM takes
  them as ``PoolingParams.extra_kwargs["compressed_token_type_ids"]`` (index
  of the first type-1 token), **not** from ``TokensPrompt["token_type_ids"]``,
  which the engine ignores.

Both share one WordPiece tokenizer (``tokenizers``; vocabulary built
deterministically from word counts over the generated corpus of
:mod:`tools.tiny_model`, see ``_wordpiece_vocab``; ``BertTokenizer``-compatible:
lowercase + accent stripping, ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``,
``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]`` templates with type ids).

Model sizes: 2 layers, hidden 128, 4 heads (head_dim 32: vLLM's CPU attention
rejects 16), intermediate 256, 512 positions, float32.  Nothing is
downloaded.  Usage::

    from tools.tiny_bert import build_tiny_bert, default_bert_dir
    embed_dir = build_tiny_bert(default_bert_dir("embed"), kind="embed")
    rerank_dir = build_tiny_bert(default_bert_dir("rerank"), kind="rerank")

    # or from the command line (prints the directory):
    python -m tools.tiny_bert {embed|rerank} [DIR] [--force]
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

from tools import tiny_model as _tm

__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "build_tiny_bert",
    "default_bert_dir",
    "main",
]

# Bump when the produced artefacts change in a way the source hashes would
# not reflect (e.g. to force a rebuild after a library upgrade).
FORMAT_VERSION = 1

KINDS = ("embed", "rerank")
STAMP_FILE = ".tiny_bert_stamp.json"

# Weight seeds, one per kind; the tokenizer (shared) uses the corpus seed.
SEEDS = {"embed": 4321, "rerank": 8765}
CORPUS_SEED = 2468

# Model hyper-parameters.
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 2
NUM_HEADS = 4
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS  # 32: vLLM's CPU attention rejects 16
MAX_POSITIONS = 512
TYPE_VOCAB_SIZE = 2
LAYER_NORM_EPS = 1e-12
# Embedding tables are followed by a LayerNorm, so only their relative scale
# matters: word, position and token-type embeddings get the same scale so the
# token type (segment A/B of a rerank pair) visibly changes the output.
EMBED_STD = 0.5
# Query/key weights get twice the ~1/sqrt(fan_in) scale of the other linears
# so attention is peaked enough for the [CLS] state (the reranker's input) to
# depend clearly on the pair, and the classifier is scaled so rerank scores
# spread over ~0.6..0.97 with a visible token-type effect (>= 0.02 on the
# sigmoid score for typical pairs) instead of all sitting near one value.
QK_STD_SCALE = 2.0
CLASSIFIER_STD = 0.2

WORDPIECE_VOCAB_SIZE = 3000
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4
PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN = SPECIAL_TOKENS

_COMMON_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
REQUIRED_FILES = {
    "embed": (
        *_COMMON_FILES,
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ),
    "rerank": _COMMON_FILES,
}

# sentence-transformers module list of the embedding model (what vLLM's
# get_pooling_config reads: Pooling -> pooling type, Normalize -> normalize).
ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {
        "idx": 2,
        "name": "2",
        "path": "2_Normalize",
        "type": "sentence_transformers.models.Normalize",
    },
]
ST_POOLING = {
    "word_embedding_dimension": HIDDEN_SIZE,
    "pooling_mode_cls_token": False,
    "pooling_mode_mean_tokens": True,
    "pooling_mode_max_tokens": False,
    "pooling_mode_mean_sqrt_len_tokens": False,
    "pooling_mode_weightedmean_tokens": False,
    "pooling_mode_lasttoken": False,
    "include_prompt": True,
}
CE_ACTIVATION = "torch.nn.modules.activation.Sigmoid"


# --------------------------------------------------------------------------
# Paths / stamp
# --------------------------------------------------------------------------


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def default_bert_dir(kind: str) -> Path:
    """``$TINY_BERT_DIR_<KIND>`` if set, else ``<repo>/.cache/tiny-bert-<kind>``."""
    _check_kind(kind)
    env = os.environ.get(f"TINY_BERT_DIR_{kind.upper()}")
    if env:
        return Path(env).expanduser().resolve()
    return _tm._repo_root() / ".cache" / f"tiny-bert-{kind}"


def _expected_stamp(kind: str) -> dict:
    # tiny_model.py provides the corpus, so its source is part of the input.
    digest = hashlib.sha256()
    for src in (Path(__file__), Path(_tm.__file__)):
        digest.update(hashlib.sha256(src.read_bytes()).digest())
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "source_sha256": digest.hexdigest(),
    }


def _is_complete(model_dir: Path, kind: str) -> bool:
    try:
        stamp = json.loads((model_dir / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    if stamp != _expected_stamp(kind):
        return False
    return all((model_dir / name).is_file() for name in REQUIRED_FILES[kind])


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def _wordpiece_vocab(normalizer, pre_tokenizer) -> dict[str, int]:
    """Deterministic WordPiece vocabulary "trained" on the generated corpus.

    ``tokenizers``' ``WordPieceTrainer`` (like ``BpeTrainer`` with a
    ``continuing_subword_prefix``) is not reproducible across processes -- it
    breaks ties in hash-map order, so vocab size and ids change from run to
    run.  Instead we use the tokenizer's own normalizer / pre-tokenizer to
    count words and keep: the special tokens (ids 0..4), every character seen
    (as a word start and as a ``##`` continuation, so any text made of seen
    characters encodes without ``[UNK]``), then the most frequent words
    (count >= 2, ties by string) up to ``WORDPIECE_VOCAB_SIZE``.  Out-of-vocab
    words (e.g. most numbers) are split by WordPiece's greedy longest match.
    """
    from collections import Counter

    counts: Counter[str] = Counter()
    for doc in _tm._corpus(seed=CORPUS_SEED):
        words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(doc))
        counts.update(word for word, _ in words)
    chars = sorted({c for word in counts for c in word})
    tokens = [*SPECIAL_TOKENS, *chars, *("##" + c for c in chars)]
    ranked = sorted((w for w, n in counts.items() if n >= 2), key=lambda w: (-counts[w], w))
    seen = set(tokens)
    for word in ranked:
        if len(tokens) >= WORDPIECE_VOCAB_SIZE:
            break
        if word not in seen:
            seen.add(word)
            tokens.append(word)
    return {token: i for i, token in enumerate(tokens)}


def _build_tokenizer():
    """WordPiece tokenizer with exactly the pipeline transformers'
    ``BertTokenizer`` (v5, which rebuilds normalizer / pre-tokenizer /
    decoder / post-processor from its init args) would construct, so raw
    ``tokenizers``, transformers and vLLM all agree."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocab = _wordpiece_vocab(normalizer, pre_tokenizer)
    tok = Tokenizer(
        models.WordPiece(
            vocab, unk_token=UNK_TOKEN, continuing_subword_prefix="##", max_input_chars_per_word=100
        )
    )
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
            for t in SPECIAL_TOKENS
        ]
    )
    for i, content in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(content) != i:  # pragma: no cover - vocab contract
            raise RuntimeError(f"unexpected id for {content}: {tok.token_to_id(content)}")
    cls_id, sep_id = tok.token_to_id(CLS_TOKEN), tok.token_to_id(SEP_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS_TOKEN}:0 $A:0 {SEP_TOKEN}:0",
        pair=f"{CLS_TOKEN}:0 $A:0 {SEP_TOKEN}:0 $B:1 {SEP_TOKEN}:1",
        special_tokens=[(CLS_TOKEN, cls_id), (SEP_TOKEN, sep_id)],
    )
    return tok


def _tokenizer_config() -> dict:
    return {
        "added_tokens_decoder": {
            str(i): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, content in enumerate(SPECIAL_TOKENS)
        },
        "clean_up_tokenization_spaces": True,
        "cls_token": CLS_TOKEN,
        "do_basic_tokenize": True,
        "do_lower_case": True,
        "mask_token": MASK_TOKEN,
        "model_max_length": MAX_POSITIONS,
        "never_split": None,
        "pad_token": PAD_TOKEN,
        "sep_token": SEP_TOKEN,
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "tokenizer_class": "BertTokenizer",
        "unk_token": UNK_TOKEN,
    }


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


def _model_config(kind: str, vocab_size: int) -> dict:
    config = {
        "architectures": ["BertModel" if kind == "embed" else "BertForSequenceClassification"],
        "model_type": "bert",
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout": None,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE_SIZE,
        "layer_norm_eps": LAYER_NORM_EPS,
        "max_position_embeddings": MAX_POSITIONS,
        "num_attention_heads": NUM_HEADS,
        "num_hidden_layers": NUM_LAYERS,
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        "type_vocab_size": TYPE_VOCAB_SIZE,
        "vocab_size": vocab_size,
        "dtype": "float32",
        "torch_dtype": "float32",
        "transformers_version": _tm._transformers_version(),
    }
    if kind == "rerank":
        config.update(
            {
                "id2label": {"0": "LABEL_0"},
                "label2id": {"LABEL_0": 0},
                # What sentence-transformers CrossEncoder writes; vLLM's
                # get_act_fn reads it (and would default to sigmoid for a
                # single label anyway).
                "sentence_transformers": {"activation_fn": CE_ACTIVATION},
            }
        )
    return config


def _state_dict(kind: str, vocab_size: int):
    import torch

    gen = torch.Generator().manual_seed(SEEDS[kind])

    def normal(*shape, std):
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    def linear(prefix, out_features, in_features, std=None):
        # ~Kaiming scale keeps activations O(1) so attention is not uniform
        # and the layers actually mix the tokens.
        w_std = std if std is not None else 1.0 / math.sqrt(in_features)
        sd[prefix + ".weight"] = normal(out_features, in_features, std=w_std)
        sd[prefix + ".bias"] = normal(out_features, std=0.02)

    def layer_norm(prefix):
        sd[prefix + ".weight"] = 1.0 + normal(HIDDEN_SIZE, std=0.1)
        sd[prefix + ".bias"] = normal(HIDDEN_SIZE, std=0.02)

    sd: dict = {}
    p = "" if kind == "embed" else "bert."
    sd[p + "embeddings.word_embeddings.weight"] = normal(vocab_size, HIDDEN_SIZE, std=EMBED_STD)
    sd[p + "embeddings.position_embeddings.weight"] = normal(
        MAX_POSITIONS, HIDDEN_SIZE, std=EMBED_STD
    )
    sd[p + "embeddings.token_type_embeddings.weight"] = normal(
        TYPE_VOCAB_SIZE, HIDDEN_SIZE, std=EMBED_STD
    )
    layer_norm(p + "embeddings.LayerNorm")
    for i in range(NUM_LAYERS):
        lp = f"{p}encoder.layer.{i}."
        qk_std = QK_STD_SCALE / math.sqrt(HIDDEN_SIZE)
        linear(lp + "attention.self.query", HIDDEN_SIZE, HIDDEN_SIZE, std=qk_std)
        linear(lp + "attention.self.key", HIDDEN_SIZE, HIDDEN_SIZE, std=qk_std)
        linear(lp + "attention.self.value", HIDDEN_SIZE, HIDDEN_SIZE)
        linear(lp + "attention.output.dense", HIDDEN_SIZE, HIDDEN_SIZE)
        layer_norm(lp + "attention.output.LayerNorm")
        linear(lp + "intermediate.dense", INTERMEDIATE_SIZE, HIDDEN_SIZE)
        linear(lp + "output.dense", HIDDEN_SIZE, INTERMEDIATE_SIZE)
        layer_norm(lp + "output.LayerNorm")
    # BertModel's pooler (CLS -> dense -> tanh): unused by mean-pooled
    # embeddings but part of the checkpoint; the reranker's score head.
    linear(p + "pooler.dense", HIDDEN_SIZE, HIDDEN_SIZE)
    if kind == "rerank":
        linear("classifier", 1, HIDDEN_SIZE, std=CLASSIFIER_STD)
    return {k: v.contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------


def _build_into(target: Path, kind: str) -> None:
    from safetensors.torch import save_file

    write = _tm._write_json
    tok = _build_tokenizer()
    vocab_size = tok.get_vocab_size(with_added_tokens=True)

    tok.save(str(target / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(vocab_size)):  # pragma: no cover
        raise RuntimeError("WordPiece vocab ids are not contiguous")
    (target / "vocab.txt").write_text("".join(t + "\n" for t, _ in by_id), encoding="utf-8")
    write(target / "tokenizer_config.json", _tokenizer_config())
    write(
        target / "special_tokens_map.json",
        {
            "cls_token": CLS_TOKEN,
            "mask_token": MASK_TOKEN,
            "pad_token": PAD_TOKEN,
            "sep_token": SEP_TOKEN,
            "unk_token": UNK_TOKEN,
        },
    )
    write(target / "config.json", _model_config(kind, vocab_size))
    if kind == "embed":
        (target / "modules.json").write_text(json.dumps(ST_MODULES, indent=2) + "\n")
        write(
            target / "sentence_bert_config.json",
            # The tokenizer lowercases itself; vLLM would lowercase again.
            {"do_lower_case": False, "max_seq_length": MAX_POSITIONS},
        )
        (target / "1_Pooling").mkdir()
        write(target / "1_Pooling" / "config.json", ST_POOLING)
    save_file(
        _state_dict(kind, vocab_size), str(target / "model.safetensors"), metadata={"format": "pt"}
    )
    # Written last: its presence (with matching content) marks completeness.
    write(target / STAMP_FILE, _expected_stamp(kind))


def build_tiny_bert(out_dir: str | os.PathLike[str], *, kind: str, force: bool = False) -> Path:
    """Build the tiny BERT ``kind`` ("embed" or "rerank") into ``out_dir``
    (if needed) and return its path.

    Idempotent: an existing complete build with a matching stamp is reused
    unless ``force``.  Built in a sibling temp directory and renamed into
    place under a lock file, so concurrent processes never observe a
    half-written directory.
    """
    _check_kind(kind)
    return _tm.build_in_place(
        Path(out_dir),
        complete=lambda out: _is_complete(out, kind),
        build=lambda tmp: _build_into(tmp, kind),
        what="tiny-bert",
        stamp_file=STAMP_FILE,
        force=force,
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tools.tiny_bert",
        description="Build a tiny test BERT model (if needed) and print its directory.",
    )
    parser.add_argument("kind", choices=KINDS, help="embed (BertModel) or rerank (cross-encoder)")
    parser.add_argument(
        "dir",
        nargs="?",
        default=None,
        help="output directory (default: $TINY_BERT_DIR_<KIND> or <repo>/.cache/tiny-bert-<kind>)",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if an up-to-date build exists"
    )
    args = parser.parse_args(argv)
    out = args.dir if args.dir else default_bert_dir(args.kind)
    print(build_tiny_bert(out, kind=args.kind, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
