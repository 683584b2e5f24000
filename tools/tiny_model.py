"""Build a tiny, deterministic Qwen2-architecture causal LM for tests.

The model is randomly initialised (fixed seed) and therefore generates
gibberish, but it is a real Hugging Face model directory that both
``transformers`` and vLLM can load in a couple of seconds on CPU:

* ``config.json`` / ``model.safetensors`` -- ``Qwen2ForCausalLM``, 2 layers,
  hidden 128, 4 attention heads (head_dim 32), 2 KV heads, float32 weights.
* ``tokenizer.json`` / ``tokenizer_config.json`` -- a byte-level BPE tokenizer
  trained locally on a generated corpus (any text round-trips exactly), with
  Qwen3-style added tokens and a Qwen3-style chat template (tools, tool calls,
  reasoning, ``enable_thinking``).
* ``generation_config.json`` -- eos = ``<|im_end|>``.

Nothing is downloaded.  Usage::

    from tools.tiny_model import build_tiny_model, default_model_dir
    model_dir = build_tiny_model(default_model_dir())

    # or from the command line (prints the directory):
    python -m tools.tiny_model [DIR]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "ADDED_TOKENS",
    "CHAT_TEMPLATE",
    "FORMAT_VERSION",
    "build_tiny_model",
    "default_model_dir",
    "main",
]

# Bump when the produced artefacts change in a way the source hash would not
# reflect (e.g. to force a rebuild after a library upgrade).
FORMAT_VERSION = 1

SEED = 1234
STAMP_FILE = ".tiny_model_stamp.json"
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)

# Model hyper-parameters.
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS  # 32: vLLM's CPU attention rejects 16
MAX_POSITIONS = 4096
ROPE_THETA = 10000.0
RMS_EPS = 1e-6
INIT_STD = 0.02

# Number of tokens produced by BPE training (byte alphabet + merges).  The
# added tokens below are appended after these, like in the real Qwen vocab.
BPE_VOCAB_SIZE = 3000

# (content, special) in id order, mirroring Qwen3's tokenizer: the ChatML
# control tokens are special (stripped by skip_special_tokens=True) while the
# tool-call / reasoning markers are plain added tokens (special=False), so
# they survive decoding with skip_special_tokens=True and the hermes tool
# parser / qwen3 & deepseek_r1 reasoning parsers can see them in the text
# *and* find their ids in the vocab.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"

# Same pipeline as Qwen2/Qwen3's tokenizer.json: NFC normalizer, regex split,
# byte-level mapping (no <unk>: every string is encodable).  NFC is kept on
# purpose: transformers>=5 loads any ``model_type: qwen2`` tokenizer as
# ``Qwen2Tokenizer``, which rebuilds the pipeline with NFC regardless of
# tokenizer.json, so raw ``tokenizers`` and transformers/vLLM agree only if
# tokenizer.json has it too.  Consequence (same as real Qwen): decode(encode(s))
# == unicodedata.normalize("NFC", s), i.e. exact for all NFC text (ASCII,
# JSON, precomposed accents, CJK, emoji, ...).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3-style ChatML template (hermes JSON tool calls, <think> reasoning,
# enable_thinking switch).  Like Qwen3, reasoning_content of assistant turns
# is only rendered for turns after the last real user query.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content + '\n\n' }}
        {%- endif %}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + (messages[0].content if messages[0].content is string else '') + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif message.reasoning is string %}
            {%- set reasoning_content = message.reasoning %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501


# --------------------------------------------------------------------------
# Paths / stamp
# --------------------------------------------------------------------------


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_model_dir() -> Path:
    """``$TINY_MODEL_DIR`` if set, else ``<repo>/.cache/tiny-model``."""
    env = os.environ.get("TINY_MODEL_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return _repo_root() / ".cache" / "tiny-model"


def _expected_stamp() -> dict:
    source = Path(__file__).read_bytes()
    return {
        "format_version": FORMAT_VERSION,
        "source_sha256": hashlib.sha256(source).hexdigest(),
    }


def _is_complete(model_dir: Path) -> bool:
    try:
        stamp = json.loads((model_dir / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    if stamp != _expected_stamp():
        return False
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """Inter-process lock next to ``out_dir`` (no-op where flock is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------


def _split(text: str, sep: str | None = None) -> list[str]:
    return [w for w in text.strip("\n").split(sep) if w]


_WORDS = _split("""
the a an of to and in is it that for on with as was be by at this are from or
have not you he she they we his her their our your my its which will can would
there what about when if out up so one all more some do no time just like into
than then them only new other could also after use two how first way may any
these over work well even because back most good people year day make know get
take see come think look want give find tell ask need feel try leave call keep
help show hear play run move live believe hold bring happen write provide sit
stand lose pay meet include continue set learn change lead understand watch
follow stop create speak read allow add spend grow open walk win offer remember
love consider appear buy wait serve die send expect build stay fall cut reach
kill remain suggest raise pass sell require report decide pull return explain
hope develop carry break receive agree support hit produce eat cover catch draw
choose weather city country river mountain ocean forest garden house street
market school library museum station airport hotel restaurant kitchen window
table chair book paper letter message answer question problem solution model
server client request response worker engine token stream batch queue cache
function argument parameter value result error status code data file line
number string object array list field key name type version config option
morning evening night today tomorrow yesterday week month summer winter spring
autumn rain snow wind cloud sun storm temperature degree forecast humidity
quick brown lazy small large tiny huge bright dark warm cold hot cool happy
sad simple complex fast slow early late easy hard clear short long old young
""")

_NAMES = _split("""
Paris London Tokyo Berlin Madrid Rome Vienna Prague Lisbon Dublin Oslo Seoul
Sydney Toronto Chicago Boston Denver Austin Seattle Cairo Lagos Nairobi Lima
Alice Bob Carol Dave Eve Frank Grace Heidi Ivan Judy Mallory Oscar Peggy Trent
""")

# Separated by "|" and newlines.
_UNICODE_SNIPPETS = _split(
    """
café|naïve|résumé|Zürich|São Paulo|München|Kraków|niño
façade|crème brûlée|Ångström|smörgåsbord|Øresund|東京|北京|こんにちは
世界|你好|안녕하세요|Привет мир|Γειά σου|שלום|مرحبا|नमस्ते
°C|°F|€|£|¥|—|…|“quoted”
‘single’|→|✓|★|😀|🚀|🌧️|👍🏽
∑|π|√2|≤|≥|±|×|÷
∞|\u00a0|\u200b
""".replace("\n", "|"),  # noqa: RUF001
    "|",
)

_FUNCTIONS = [
    "get_weather",
    "get_time",
    "search_web",
    "send_email",
    "create_event",
    "lookup_user",
    "convert_currency",
    "calculate",
    "translate_text",
    "read_file",
    "write_file",
    "list_files",
    "get_stock_price",
    "book_flight",
]

_ARG_NAMES = [
    "city",
    "country",
    "unit",
    "query",
    "to",
    "subject",
    "body",
    "date",
    "time",
    "user_id",
    "amount",
    "from",
    "expression",
    "text",
    "language",
    "path",
    "content",
    "symbol",
    "origin",
    "destination",
    "limit",
    "verbose",
]


def _sentence(rng: random.Random) -> str:
    n = rng.randint(4, 16)
    words = [rng.choice(_WORDS) for _ in range(n)]
    if rng.random() < 0.4:
        words.insert(rng.randrange(len(words) + 1), rng.choice(_NAMES))
    if rng.random() < 0.15:
        words.insert(rng.randrange(len(words) + 1), rng.choice(_UNICODE_SNIPPETS))
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words) + 1), str(rng.randint(0, 100000)))
    text = " ".join(words)
    text = text[0].upper() + text[1:]
    return text + rng.choice([".", ".", ".", "?", "!", ",", ";", ":"])


def _json_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth < 2 and r < 0.15:
        return {
            rng.choice(_ARG_NAMES): _json_value(rng, depth + 1) for _ in range(rng.randint(1, 3))
        }
    if depth < 2 and r < 0.25:
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if r < 0.45:
        return rng.randint(-1000, 100000)
    if r < 0.55:
        return round(rng.uniform(-100, 100), rng.randint(1, 4))
    if r < 0.62:
        return rng.choice([True, False, None])
    if r < 0.75:
        return rng.choice(_NAMES + _UNICODE_SNIPPETS)
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 5)))


def _json_doc(rng: random.Random) -> str:
    obj = {rng.choice(_ARG_NAMES): _json_value(rng) for _ in range(rng.randint(1, 5))}
    if rng.random() < 0.3:
        obj = {"name": rng.choice(_FUNCTIONS), "arguments": obj}
    return json.dumps(
        obj,
        ensure_ascii=rng.random() < 0.3,
        indent=rng.choice([None, None, 2, 4]),
        sort_keys=rng.random() < 0.3,
    )


def _code(rng: random.Random) -> str:
    fn = rng.choice(_FUNCTIONS)
    a, b = rng.sample(_ARG_NAMES, 2)
    w = rng.choice(_WORDS)
    n = rng.randint(0, 999)
    templates = [
        f'def {fn}({a}, {b}=None):\n    """{_sentence(rng)}"""\n'
        f'    if {b} is None:\n        {b} = {n}\n    return {{"{a}": {a}, "{b}": {b}}}\n',
        f"async def {fn}(self, {a}: str) -> dict[str, int]:\n"
        f"    result = await self.client.{w}({a}, timeout={n})\n"
        f"    for i in range(len(result)):\n"
        f'        print(f"{{i}}: {{result[i]!r}}")\n    return result\n',
        f"class {w.capitalize()}Worker:\n    def __init__(self, {a}: int = {n}) -> None:\n"
        f"        self.{a} = {a}\n        self._{b} = []  # {_sentence(rng)}\n",
        f"function {fn}({a}, {b}) {{\n  const {w} = {a}.map((x) => x * {n});\n"
        f"  return {{ {a}: {w}, {b}: {b} ?? null }};\n}}\n",
        f'import json\nimport os\n\n{w} = json.loads(os.environ.get("{a.upper()}", "{{}}"))\n'
        f'assert isinstance({w}, dict), "{_sentence(rng)}"\n',
        f"for (let i = 0; i < {n}; i++) {{\n"
        f"  if (i % 2 === 0) {{ console.log(`{w} ${{i}}`); }}\n}}\n",
        f"SELECT {a}, {b}, COUNT(*) AS n FROM {w}s WHERE {a} > {n} GROUP BY {a} ORDER BY n DESC;\n",
        f'$ python -m tools.{fn} --{a}={n} --{b} "{rng.choice(_NAMES)}"\n',
    ]
    return rng.choice(templates)


def _chat_snippet(rng: random.Random) -> str:
    fn = rng.choice(_FUNCTIONS)
    args = {rng.choice(_ARG_NAMES): _json_value(rng) for _ in range(rng.randint(1, 3))}
    call = json.dumps({"name": fn, "arguments": args}, ensure_ascii=False)
    think = " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))
    parts = [
        f"<think>\n{think}\n</think>\n\n",
        f"<tool_call>\n{call}\n</tool_call>",
        f"<tool_response>\n{_json_doc(rng)}\n</tool_response>",
        f"<|im_start|>user\n{_sentence(rng)}<|im_end|>\n",
        f"<|im_start|>assistant\n{_sentence(rng)}<|im_end|>\n",
    ]
    rng.shuffle(parts)
    return "".join(parts[: rng.randint(1, len(parts))])


def _corpus(seed: int = SEED, n_docs: int = 4000) -> list[str]:
    rng = random.Random(seed)
    docs = []
    makers = [_sentence, _sentence, _sentence, _json_doc, _json_doc, _code, _chat_snippet]
    for _ in range(n_docs):
        maker = rng.choice(makers)
        if maker is _sentence:
            doc = " ".join(_sentence(rng) for _ in range(rng.randint(1, 5)))
            if rng.random() < 0.3:
                doc += "\n\n" + " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))
        else:
            doc = maker(rng)
        docs.append(doc)
    # Make sure every word / snippet appears at least once.
    docs.append(" ".join(_WORDS + _NAMES + _FUNCTIONS + _ARG_NAMES))
    docs.append(" ".join(_UNICODE_SNIPPETS))
    docs.append("".join(chr(c) for c in range(32, 127)))
    return docs


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def _build_tokenizer():
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)

    for content, special in ADDED_TOKENS:
        added = AddedToken(
            content,
            special=special,
            normalized=False,
            single_word=False,
            lstrip=False,
            rstrip=False,
        )
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
    return tok


def _tokenizer_config(token_ids: dict[str, int]) -> dict:
    added_tokens_decoder = {
        str(token_ids[content]): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for content, special in ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MAX_POSITIONS,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        # What transformers>=5 uses for model_type qwen2 anyway (see above).
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


def _model_config(vocab_size: int, token_ids: dict[str, int]) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_bias": True,
        "attention_dropout": 0.0,
        "bos_token_id": token_ids[PAD_TOKEN],
        "eos_token_id": token_ids[EOS_TOKEN],
        "pad_token_id": token_ids[PAD_TOKEN],
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "head_dim": HEAD_DIM,
        "initializer_range": INIT_STD,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITIONS,
        "max_window_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": NUM_KV_HEADS,
        "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_THETA,
        "rope_scaling": None,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab_size,
        "dtype": "float32",
        "torch_dtype": "float32",
        "transformers_version": _transformers_version(),
    }


def _transformers_version() -> str:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:  # pragma: no cover
        return "unknown"


def _state_dict(vocab_size: int):
    import torch

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)

    def normal(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * INIT_STD

    q_out = NUM_HEADS * HEAD_DIM
    kv_out = NUM_KV_HEADS * HEAD_DIM
    sd = {"model.embed_tokens.weight": normal(vocab_size, HIDDEN_SIZE)}
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(HIDDEN_SIZE)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN_SIZE)
        sd[p + "self_attn.q_proj.weight"] = normal(q_out, HIDDEN_SIZE)
        sd[p + "self_attn.q_proj.bias"] = normal(q_out)
        sd[p + "self_attn.k_proj.weight"] = normal(kv_out, HIDDEN_SIZE)
        sd[p + "self_attn.k_proj.bias"] = normal(kv_out)
        sd[p + "self_attn.v_proj.weight"] = normal(kv_out, HIDDEN_SIZE)
        sd[p + "self_attn.v_proj.bias"] = normal(kv_out)
        sd[p + "self_attn.o_proj.weight"] = normal(HIDDEN_SIZE, q_out)
        sd[p + "mlp.gate_proj.weight"] = normal(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        sd[p + "mlp.up_proj.weight"] = normal(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        sd[p + "mlp.down_proj.weight"] = normal(HIDDEN_SIZE, INTERMEDIATE_SIZE)
    sd["model.norm.weight"] = torch.ones(HIDDEN_SIZE)
    # Untied head: with tied embeddings a random tiny model mostly repeats
    # the previous token under greedy decoding; an independent head gives
    # varied (still meaningless) text.
    sd["lm_head.weight"] = normal(vocab_size, HIDDEN_SIZE)
    return {k: v.contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(
        json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8"
    )


def _build_into(target: Path) -> None:
    from safetensors.torch import save_file

    tok = _build_tokenizer()
    token_ids = {content: tok.token_to_id(content) for content, _ in ADDED_TOKENS}
    vocab_size = tok.get_vocab_size(with_added_tokens=True)

    tok.save(str(target / "tokenizer.json"))
    _write_json(target / "tokenizer_config.json", _tokenizer_config(token_ids))
    _write_json(
        target / "special_tokens_map.json",
        {
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
        },
    )
    _write_json(target / "config.json", _model_config(vocab_size, token_ids))
    _write_json(
        target / "generation_config.json",
        {
            "bos_token_id": token_ids[PAD_TOKEN],
            "eos_token_id": token_ids[EOS_TOKEN],
            "pad_token_id": token_ids[PAD_TOKEN],
            "transformers_version": _transformers_version(),
        },
    )
    save_file(_state_dict(vocab_size), str(target / "model.safetensors"), metadata={"format": "pt"})
    # Written last: its presence (with matching content) marks completeness.
    _write_json(target / STAMP_FILE, _expected_stamp())


def build_in_place(
    out_dir: Path,
    *,
    complete: Callable[[Path], bool],
    build: Callable[[Path], None],
    what: str,
    stamp_file: str,
    force: bool = False,
) -> Path:
    """Build a test artefact into ``out_dir`` once, safely between processes:
    reused while ``complete(out)`` holds (unless ``force``); otherwise built
    by ``build(tmp)`` in a sibling temp directory under a lock file, made
    world-readable and renamed into place, so no process sees a half-written
    directory. A non-empty directory without ``stamp_file`` is never replaced."""
    out = out_dir.expanduser().resolve()
    if not force and complete(out):
        return out
    if out.is_dir() and any(out.iterdir()) and not (out / stamp_file).exists():
        # Never replace (and delete) a directory we did not create.
        raise FileExistsError(f"{out} exists, is not empty and is not a {what} build")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(out):
        # Another process may have finished the build while we waited.
        if not force and complete(out):
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp creates 0700, save_pretrained some 0600
            for root, dirs, files in os.walk(tmp):
                for d in dirs:
                    os.chmod(Path(root) / d, 0o755)
                for f in files:
                    os.chmod(Path(root) / f, 0o644)
            if out.exists() or out.is_symlink():
                trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.rename(out, trash / "old")
                os.rename(tmp, out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tiny_model(out_dir: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Build the tiny model into ``out_dir`` (if needed) and return its path.

    Idempotent: an existing complete build with a matching stamp is reused
    unless ``force``.  The model is built in a sibling temp directory and
    renamed into place, and builders serialise on a lock file, so concurrent
    processes never observe a half-written directory.
    """
    return build_in_place(
        Path(out_dir),
        complete=_is_complete,
        build=_build_into,
        what="tiny-model",
        stamp_file=STAMP_FILE,
        force=force,
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tools.tiny_model",
        description="Build the tiny test model (if needed) and print its directory.",
    )
    parser.add_argument(
        "dir",
        nargs="?",
        default=None,
        help="output directory (default: $TINY_MODEL_DIR or <repo>/.cache/tiny-model)",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if an up-to-date build exists"
    )
    args = parser.parse_args(argv)
    path = build_tiny_model(args.dir if args.dir else default_model_dir(), force=args.force)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def build_tiny_lora(out_dir: str | Path, *, rank: int = 8, seed: int = 7) -> Path:
    """A PEFT-format LoRA adapter for the tiny model (q/v projections of both
    layers), random but large enough to change greedy output visibly."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    hidden, kv_dim = HIDDEN_SIZE, NUM_KV_HEADS * HEAD_DIM
    tensors = {}
    for layer in range(2):
        for proj, out_features in (("q_proj", hidden), ("v_proj", kv_dim)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.5
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(out_features, rank, generator=gen) * 0.5
            )
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny-qwen2",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
