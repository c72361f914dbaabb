"""Convert a GGUF file (Llama or Qwen2) into a Hugging Face folder of float safetensors.

The `gguf` package reads and dequantizes the tensors. llama.cpp stores Llama's Q and K weights
permuted for its interleaved RoPE; they are permuted back to Hugging Face's rotate-half layout.
The tokenizer (vocabulary, merges, chat template) is rebuilt by transformers' GGUF reader.
"""

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from scalesim.errors import ModelLoadError

logger = logging.getLogger(__name__)

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _hf_name(gguf_name: str) -> str:
    stem, kind = gguf_name.rsplit(".", 1)
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    _, layer, part = stem.split(".", 2)
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _unpermute_rope(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rotary halves."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _read_config(reader) -> dict:
    def field(key: str, default=None):
        item = reader.fields.get(key)
        return default if item is None else item.contents()

    arch = field("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(_ARCHITECTURES)}")
    vocab_size = field(f"{arch}.vocab_size") or len(field("tokenizer.ggml.tokens"))
    heads = field(f"{arch}.attention.head_count")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(vocab_size),
        "hidden_size": int(field(f"{arch}.embedding_length")),
        "intermediate_size": int(field(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(field(f"{arch}.block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(field(f"{arch}.attention.head_count_kv", heads)),
        "rms_norm_eps": float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field(f"{arch}.context_length")),
        "tie_word_embeddings": not has_output,
        "attention_bias": arch == "qwen2",
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def convert_gguf(gguf_path: Path, out_folder: Path) -> Path:
    """Write config.json, model.safetensors and tokenizer files for `gguf_path` into `out_folder`.

    The folder appears whole or not at all (written to a temporary sibling, then renamed).
    """
    import gguf
    from gguf.quants import dequantize
    from transformers import AutoTokenizer

    gguf_path, out_folder = Path(gguf_path), Path(out_folder)
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    config = _read_config(reader)
    permute_rope = config["model_type"] in ("llama", "mistral")
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        values = values.reshape([int(d) for d in reversed(tensor.shape)]) if values.ndim != len(tensor.shape) else values
        if permute_rope and name.endswith("q_proj.weight"):
            values = _unpermute_rope(values, config["num_attention_heads"])
        elif permute_rope and name.endswith("k_proj.weight"):
            values = _unpermute_rope(values, config["num_key_value_heads"])
        tensors[name] = torch.from_numpy(np.ascontiguousarray(values))
    out_folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out_folder.name + ".", dir=out_folder.parent))
    try:
        save_file(tensors, str(staging / "model.safetensors"))
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer.save_pretrained(str(staging))
        (staging / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}))
        shutil.rmtree(out_folder, ignore_errors=True)
        staging.rename(out_folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s -> %s", gguf_path, out_folder)
    return out_folder
