"""Copies of the tiny model's tokenizer with marker tokens dropped, added or made
special: how the parser tests meet models whose markers are added tokens, special
tokens (skipped from the text) or plain text."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path


def tokenizer_variant(
    src: Path,
    dst: Path,
    *,
    drop: Iterable[str] = (),
    add: Iterable[str] = (),
    special: bool | None = None,
    markers: Iterable[str] = (),
) -> Path:
    """`src`'s tokenizer in `dst`, without the `drop` tokens and with `add` as new
    added tokens. `special` (when given) is set on `markers` and on the added
    tokens; otherwise markers keep theirs and added tokens are special."""
    drop, markers = set(drop), set(markers)
    dst.mkdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(src / name, dst / name)
    tok = json.loads((src / "tokenizer.json").read_text())
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    decoder = cfg["added_tokens_decoder"]
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in drop]
    for key in [k for k, v in decoder.items() if v["content"] in drop]:
        del decoder[key]
    if special is not None:
        for entry in [*tok["added_tokens"], *decoder.values()]:
            if entry["content"] in markers:
                entry["special"] = special
    next_id = max(t["id"] for t in tok["added_tokens"]) + 1
    for i, content in enumerate(add):
        entry = {"content": content, "single_word": False, "lstrip": False, "rstrip": False}
        entry.update(normalized=False, special=True if special is None else special)
        tok["added_tokens"].append({"id": next_id + i, **entry})
        decoder[str(next_id + i)] = entry
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst
