"""A PEFT-format LoRA adapter (adapter_config.json + adapter_model.safetensors), validated
against the base model and kept per (layer, target module) as A [r, in], B [out, r], scale."""

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from scalesim.config import DEFAULT_MAX_LORA_RANK
from scalesim.errors import InvalidRequestError
from scalesim.memory.copy_stream import moved
from scalesim.models.config import ModelConfig
from scalesim.weights.handle import WeightHandle

MAX_LAYER_DIGITS = 6  # a layer index in a tensor key; longer is not a layer of any model
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def target_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LoRA-able projection of the base model."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def _read_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.exists():
        raise InvalidRequestError(f"adapter {folder}: no adapter_config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"adapter {folder}: corrupt adapter_config.json ({exc})") from exc
    except OSError as exc:
        raise InvalidRequestError(f"adapter {folder}: adapter_config.json cannot be read ({exc})") from exc
    if not isinstance(config, dict):
        raise InvalidRequestError(f"adapter {folder}: adapter_config.json must hold a JSON object, "
                                  f"not {type(config).__name__}")
    return config


def _number(config: dict, key: str, default, where: str, kind: type) -> int | float:
    """config[key] as `kind` (int or float), finite and positive; InvalidRequestError naming it."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)) \
            or not math.isfinite(value) or value <= 0:
        raise InvalidRequestError(f"{where}: adapter_config.json {key} must be a positive "
                                  f"{'integer' if kind is int else 'number'}, got {value!r}")
    return kind(value)


def _parse_key(key: str) -> tuple[int, str, str] | None:
    """('...layers.3.self_attn.q_proj.lora_A.weight') -> (3, 'q_proj', 'A'); None if not LoRA."""
    parts = key.split(".")
    if "layers" not in parts or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
        return None
    layer = parts[parts.index("layers") + 1]
    if not layer.isdecimal() or len(layer) > MAX_LAYER_DIGITS:
        return None
    return int(layer), parts[-3], parts[-2][-1]


class LoRAAdapter(WeightHandle):
    kind = "adapter"

    def __init__(self, name: str, source: Path, base: ModelConfig, compute_device: str, dtype: torch.dtype,
                 max_rank: int = DEFAULT_MAX_LORA_RANK) -> None:
        super().__init__(name, source, compute_device)
        self.base = base
        self.dtype = dtype
        self.max_rank = max_rank
        config = _read_config(self.source)
        where = f"adapter {name!r}"
        self.rank = _number(config, "r", 8, where, int)
        self._check_config(config)
        alpha = _number(config, "lora_alpha", self.rank, where, float)
        self.scale = alpha / (self.rank ** 0.5 if config.get("use_rslora") else self.rank)
        self.targets = self._normalise_targets(config.get("target_modules"))
        self.weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (A [r, in], B^T [r, out])
        self._load_from_disk(torch.device("cpu"))
        self._nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                           for a, b in self.weights.values())
        self._tier = "host"

    def _check_config(self, config: dict) -> None:
        where = f"adapter {self.name!r}"
        if config.get("peft_type", "LORA") != "LORA":
            raise InvalidRequestError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
        if not 0 < self.rank <= self.max_rank:
            raise InvalidRequestError(f"{where}: rank {self.rank} is outside 1..{self.max_rank} (max_lora_rank)")
        if config.get("bias", "none") != "none":
            raise InvalidRequestError(f"{where}: LoRA bias {config['bias']!r} is not supported (only 'none')")
        if config.get("modules_to_save"):
            raise InvalidRequestError(f"{where}: modules_to_save is not supported")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise InvalidRequestError(f"{where}: per-module rank_pattern/alpha_pattern are not supported")
        if config.get("fan_in_fan_out") or config.get("layer_replication"):
            raise InvalidRequestError(f"{where}: fan_in_fan_out and layer_replication are not supported")
        if config.get("use_dora"):
            raise InvalidRequestError(f"{where}: DoRA adapters are not supported")

    def _normalise_targets(self, targets) -> tuple[str, ...]:
        if targets is not None and not isinstance(targets, (str, list)) or \
                isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
            raise InvalidRequestError(f"adapter {self.name!r}: target_modules must be a string or a list of "
                                      f"strings, got {targets!r}")
        if isinstance(targets, str):
            targets = [t for t in LORA_TARGETS if t == targets or targets == "all-linear"]
        targets = list(targets or [])
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets:
            raise InvalidRequestError(f"adapter {self.name!r}: target modules {unknown or targets} are not in the "
                                      f"base model's LoRA-able projections {LORA_TARGETS}")
        return tuple(targets)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def _load_from_disk(self, device: torch.device) -> None:
        path = self.source / "adapter_model.safetensors"
        where = f"adapter {self.name!r}"
        if not path.exists():
            raise InvalidRequestError(f"{where}: no adapter_model.safetensors in {self.source}")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidRequestError(f"{where}: corrupt adapter_model.safetensors ({exc})") from exc
        shapes = target_shapes(self.base)
        halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            parsed = _parse_key(key)
            if parsed is None:
                raise InvalidRequestError(f"{where}: unexpected tensor {key!r}")
            layer, target, half = parsed
            if target not in shapes or not 0 <= layer < self.base.num_hidden_layers:
                raise InvalidRequestError(f"{where}: {key!r} names a module the base model does not have")
            halves.setdefault((layer, target), {})[half] = tensor
        weights = {}
        for (layer, target), pair in halves.items():
            if set(pair) != {"A", "B"}:
                raise InvalidRequestError(f"{where}: layer {layer} {target} lacks lora_A or lora_B")
            in_features, out_features = shapes[target]
            a, b = pair["A"], pair["B"]
            if tuple(a.shape) != (self.rank, in_features) or tuple(b.shape) != (out_features, self.rank):
                raise InvalidRequestError(
                    f"{where}: layer {layer} {target} has A {tuple(a.shape)} and B {tuple(b.shape)}; the base "
                    f"model needs A ({self.rank}, {in_features}) and B ({out_features}, {self.rank})")
            if not (a.isfinite().all() and b.isfinite().all()):
                raise InvalidRequestError(f"{where}: layer {layer} {target} holds NaN or infinite values")
            # B is kept transposed, [rank, out] with rows contiguous: the layout the LoRA kernel reads
            weights[(layer, target)] = (a.to(device, self.dtype).contiguous(), b.t().to(device, self.dtype).contiguous())
        if not weights:
            raise InvalidRequestError(f"{where}: no LoRA weights in {path}")
        self.weights = weights

    def _move_tensors(self, device: torch.device) -> None:
        self.weights = {k: (moved(a, device), moved(b, device)) for k, (a, b) in self.weights.items()}

    def _drop_tensors(self) -> None:
        self.weights = {}

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.weights.values() for t in pair]
