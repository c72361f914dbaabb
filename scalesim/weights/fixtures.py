"""Make real test weights: random PEFT LoRA adapters (saved by peft itself, so the files are
exactly what users have) and perturbed private models of a base model."""

import shutil
from pathlib import Path

import torch

from scalesim.models.registry import resolve_model
from scalesim.weights.lora import LORA_TARGETS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def _base_hf_model(base: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(resolve_model(base)), dtype=torch.float32)


def make_random_adapters(base: str, out_dir: Path, count: int = 1, rank: int = 8, alpha: float = 16.0,
                         targets: tuple[str, ...] = LORA_TARGETS, use_rslora: bool = False, seed: int = 0,
                         init_std: float = 0.05) -> list[Path]:
    """Save `count` random LoRA adapters for `base` under out_dir/adapter-<i>; return their folders."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
                        init_lora_weights=False, lora_dropout=0.0, bias="none")
    model = get_peft_model(_base_hf_model(base), config)
    folders = []
    for i in range(count):
        generator = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * init_std)
        folder = Path(out_dir) / f"adapter-{i}"
        model.save_pretrained(str(folder))
        folders.append(folder)
    return folders


def make_private_model(base: str, out_dir: Path, seed: int = 0, noise_std: float = 0.02) -> Path:
    """Save a copy of `base` with seeded Gaussian noise on every weight, as a Hugging Face folder."""
    model = _base_hf_model(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise_std)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    source = resolve_model(base)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out_dir / name)
    return out_dir
