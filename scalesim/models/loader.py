"""Load a Hugging Face model folder: config.json, *.safetensors and the tokenizer files."""

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from scalesim.errors import ModelLoadError
from scalesim.models.config import ModelConfig
from scalesim.models.llama import LlamaForCausalLM
from scalesim.models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of every *.safetensors file in `folder`; ModelLoadError if none or corrupt."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weight file in {folder}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"corrupt weight file {path}: {exc}") from exc
    return tensors


def load_model(folder: Path, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    """Build the model described by folder/config.json and load its weights onto `device`."""
    config = ModelConfig.from_folder(folder)
    tensors = read_safetensors(folder)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not tensor.isfinite().all():
            raise ModelLoadError(f"weight {name} in {folder} holds NaN or infinite values")
    model = LlamaForCausalLM(config)  # uninitialised storage, replaced by the file's tensors below
    try:
        model.load_hf_state_dict(tensors)
    except KeyError as exc:
        raise ModelLoadError(f"weight {exc} is missing from {folder}") from exc
    except ValueError as exc:
        raise ModelLoadError(f"weights in {folder} do not match config.json: {exc}") from exc
    tables = dict(model.rotary.named_buffers())  # float32, and kept so: rounding them through bf16 costs accuracy
    model = model.to(device=device, dtype=dtype)
    for name, table in tables.items():
        setattr(model.rotary, name, table.to(device))
    return model.eval().requires_grad_(False)


def load_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer (with chat template) saved in `folder`."""
    if not (Path(folder) / "tokenizer.json").exists():
        raise ModelLoadError(f"no tokenizer.json in {folder}")
    return Tokenizer(folder)
