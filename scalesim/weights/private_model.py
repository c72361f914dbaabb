"""A whole private weight set of the base architecture (e.g. a per-agent fine-tune)."""

from pathlib import Path

import torch

from scalesim.errors import InvalidRequestError, ModelLoadError
from scalesim.memory.copy_stream import keep_until_copied
from scalesim.models.config import ModelConfig
from scalesim.models.llama import LlamaForCausalLM
from scalesim.models.loader import load_model
from scalesim.weights.handle import WeightHandle

ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
                       "attention_bias")


def check_same_architecture(name: str, base: ModelConfig, other: ModelConfig) -> None:
    """InvalidRequestError unless `other` can share the base's KV pool and batch layout."""
    for field in ARCHITECTURE_FIELDS:
        if getattr(base, field) != getattr(other, field):
            raise InvalidRequestError(f"private model {name!r} is of another architecture: {field} is "
                                      f"{getattr(other, field)}, the base model's is {getattr(base, field)}")


class PrivateModel(WeightHandle):
    kind = "model"

    def __init__(self, name: str, source: Path, base: ModelConfig, compute_device: str, dtype: torch.dtype) -> None:
        super().__init__(name, source, compute_device)
        self.base = base
        self.dtype = dtype
        self.model: LlamaForCausalLM | None = None
        self._load_from_disk(torch.device("cpu"))
        self._nbytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in self.model.parameters()}.values())
        self._tier = "host"

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def _load_from_disk(self, device: torch.device) -> None:
        if not Path(self.source, "config.json").exists():
            raise InvalidRequestError(f"private model {self.name!r}: no config.json in {self.source}")
        try:
            config = ModelConfig.from_folder(self.source)
            check_same_architecture(self.name, self.base, config)
            self.model = load_model(self.source, self.dtype, str(device))
        except ModelLoadError as exc:
            raise InvalidRequestError(f"private model {self.name!r}: {exc}") from exc

    def _move_tensors(self, device: torch.device) -> None:
        keep_until_copied([*self.model.parameters(), *self.model.buffers()])
        self.model = self.model.to(device, non_blocking=True)

    def _drop_tensors(self) -> None:
        self.model = None

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.model is None else list({id(p): p for p in self.model.parameters()}.values())
