"""The architecture facts of a Llama-family model, read from a Hugging Face `config.json`."""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from scalesim.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
POSITIVE_INT_FIELDS = (*REQUIRED_FIELDS, "num_key_value_heads", "head_dim", "max_position_embeddings")
MAX_CONFIG_INT = 2**31 - 1


@dataclass
class ModelConfig:
    """What the model code needs; names follow Hugging Face's config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, per byte of the element type."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim

    @property
    def matmul_params(self) -> int:
        """Weights a token is multiplied through: every layer's projections and the LM head (norms
        left out). About 2x this many FLOPs per token; the weights a decode step reads."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size
        return self.num_hidden_layers * layer + self.vocab_size * h

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        """The config of a parsed config.json; ModelLoadError naming the first field that is missing,
        of the wrong type or out of range."""
        if not isinstance(raw, dict):
            raise ModelLoadError(f"config.json must hold a JSON object, not {type(raw).__name__}")
        for key in POSITIVE_INT_FIELDS:
            value = raw.get(key)
            if key not in REQUIRED_FIELDS and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_CONFIG_INT:
                raise ModelLoadError(f"config.json {key} must be a positive integer, got {value!r}")
        for key in ("rms_norm_eps", "rope_theta"):
            value = raw.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ModelLoadError(f"config.json {key} must be a positive number, got {value!r}")
        architectures = raw.get("architectures") or ["LlamaForCausalLM"]
        if not isinstance(architectures, list) or not isinstance(architectures[0], str):
            raise ModelLoadError(f"config.json architectures must be a list of names, got {architectures!r}")
        for key in ("rope_scaling", "rope_parameters"):
            if raw.get(key) is not None and not isinstance(raw[key], dict):
                raise ModelLoadError(f"config.json {key} must be an object, got {raw[key]!r}")
        eos = raw.get("eos_token_id")
        if eos is not None and not (isinstance(eos, int) or isinstance(eos, list) and all(isinstance(e, int) for e in eos)):
            raise ModelLoadError(f"config.json eos_token_id must be a token id or a list of them, got {eos!r}")
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(f"unsupported architecture {architecture!r}; supported: {SUPPORTED_ARCHITECTURES}")
        heads = raw["num_attention_heads"]
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        rope_theta = raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        rope_scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        return cls(
            architecture=architecture,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", architecture == "Qwen2ForCausalLM")),
            rope_scaling=rope_scaling,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_folder(cls, folder: Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ModelLoadError(f"no config.json in {folder}") from exc
        except OSError as exc:
            raise ModelLoadError(f"config.json in {folder} cannot be read: {exc}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"corrupt config.json in {folder}: {exc}") from exc
        try:
            return cls.from_dict(raw)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{folder}: {exc}") from exc
