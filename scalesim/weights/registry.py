"""Named LoRA adapters and private models of one engine, and the KV namespace of a request."""

import logging
import re
from pathlib import Path

import torch

from scalesim.errors import InvalidRequestError
from scalesim.models.config import ModelConfig
from scalesim.weights.handle import WeightHandle
from scalesim.config import DEFAULT_MAX_LORA_RANK
from scalesim.weights.lora import LoRAAdapter
from scalesim.weights.private_model import PrivateModel

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9_.\-/]{1,128}$")


class WeightRegistry:
    def __init__(self, base_name: str, base: ModelConfig, device: str, dtype: torch.dtype,
                 max_lora_rank: int = DEFAULT_MAX_LORA_RANK, manager=None) -> None:
        self.base_name = base_name
        self.base = base
        self.device = device
        self.dtype = dtype
        self.max_lora_rank = max_lora_rank
        self.manager = manager  # memory.manager.MemoryManager, or None to keep everything on the device
        self.adapters: dict[str, LoRAAdapter] = {}
        self.models: dict[str, PrivateModel] = {}

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError(f"name {name!r} must be 1-128 characters of letters, digits, _ . - /")
        if name in self.adapters or name in self.models or name == self.base_name:
            raise InvalidRequestError(f"name {name!r} is already registered")

    def add_adapter(self, name: str, path: str | Path) -> LoRAAdapter:
        """Load and validate a PEFT adapter folder; it starts on the compute device."""
        self._check_new_name(name)
        if not Path(path).is_dir():
            raise InvalidRequestError(f"adapter {name!r}: {path} is not a folder")
        adapter = LoRAAdapter(name, Path(path), self.base, self.device, self.dtype, self.max_lora_rank)
        self._place(adapter)
        self.adapters[name] = adapter
        logger.info("adapter %s: rank %d, %d bytes, targets %s", name, adapter.rank, adapter.nbytes, adapter.targets)
        return adapter

    def add_private_model(self, name: str, path: str | Path) -> PrivateModel:
        """Load a full weight set of the base architecture; it starts on the compute device."""
        self._check_new_name(name)
        if not Path(path).is_dir():
            raise InvalidRequestError(f"private model {name!r}: {path} is not a folder")
        model = PrivateModel(name, Path(path), self.base, self.device, self.dtype)
        self._place(model)
        self.models[name] = model
        return model

    def _place(self, handle: WeightHandle) -> None:
        """A new handle starts on the device if room can be made, else in host memory or on disk."""
        if self.manager is None:
            handle.move_to("device")
            return
        self.manager.place(handle)

    def remove(self, name: str) -> None:
        handle = self.adapters.get(name) or self.models.get(name)
        if handle is None:
            raise InvalidRequestError(f"no adapter or private model named {name!r}")
        if handle.pin_count:
            raise InvalidRequestError(f"{name!r} is in use by a running request")
        self.adapters.pop(name, None)
        self.models.pop(name, None)
        if self.manager is not None:
            self.manager.remove(handle)

    def resolve(self, adapter: str | None, model: str | None) -> tuple[LoRAAdapter | None, PrivateModel | None]:
        """The handles a request names. `model` may be the base name, 'base:adapter', or a private model."""
        if model is not None and not isinstance(model, str):
            raise InvalidRequestError("model must be a string")
        if adapter is not None and not isinstance(adapter, str):
            raise InvalidRequestError("adapter must be a string")
        private = None
        if model and model != self.base_name:
            base, sep, suffix = model.partition(":")
            if sep and base == self.base_name:
                if adapter is not None and adapter != suffix:
                    raise InvalidRequestError(f"model {model!r} names adapter {suffix!r} but adapter is {adapter!r}")
                adapter = suffix
            elif model in self.models:
                private = self.models[model]
            else:
                raise InvalidRequestError(f"unknown model {model!r}; served: {self.names()}")
        lora = None
        if adapter:
            if adapter not in self.adapters:
                raise InvalidRequestError(f"unknown adapter {adapter!r}; registered: {sorted(self.adapters)}")
            if private is not None:
                raise InvalidRequestError("an adapter applies to the base model, not to a private model")
            lora = self.adapters[adapter]
        return lora, private

    def names(self) -> list[str]:
        return [self.base_name] + [f"{self.base_name}:{a}" for a in self.adapters] + list(self.models)

    def handles(self) -> list[WeightHandle]:
        return [*self.adapters.values(), *self.models.values()]


def kv_namespace(adapter: LoRAAdapter | None, model: PrivateModel | None) -> str:
    """KV computed under one model and adapter is only ever reused under the same pair."""
    if model is not None:
        return f"model:{model.name}"
    return f"adapter:{adapter.name}" if adapter is not None else "base"
