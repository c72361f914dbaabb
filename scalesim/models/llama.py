"""The Llama family (Llama, Mistral, Qwen2) as one plain-PyTorch decoder over a paged KV cache.

Tokens of many sequences arrive flattened; `forward` returns hidden states and `compute_logits`
turns the rows that need sampling into logits. Q/K/V and gate/up projections are fused into one
matmul each, so a decoder layer is four matmuls.
"""

import torch
from torch import nn

from scalesim.layers.attention import AttentionMetadata, paged_attention
from scalesim.layers.fused import silu_and_mul
from scalesim.layers.linear import Embedding, Linear
from scalesim.layers.lora import LoRABatch
from scalesim.layers.rmsnorm import RMSNorm
from scalesim.layers.rotary import RotaryEmbedding
from scalesim.models.config import ModelConfig


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                kv_cache: torch.Tensor, meta: AttentionMetadata, lora: LoRABatch | None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if lora is not None:
            _add_deltas(lora, self.layer, x, (("q_proj", q), ("k_proj", k), ("v_proj", v)))
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        RotaryEmbedding.apply_(q, k, cos_sin)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return _project(self.o_proj, out, lora, self.layer, "o_proj")


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if lora is not None:
            gate, up = gate_up.chunk(2, dim=-1)
            _add_deltas(lora, self.layer, x, (("gate_proj", gate), ("up_proj", up)))
        return _project(self.down_proj, silu_and_mul(gate_up), lora, self.layer, "down_proj")


def _add_deltas(lora: LoRABatch, layer: int, x: torch.Tensor, outputs) -> None:
    """Add each target's LoRA delta in place into its slice of a fused projection's output."""
    for target, out in outputs:
        lora.add_delta_(layer, target, x, out)


def _project(linear: Linear, x: torch.Tensor, lora: LoRABatch | None, layer: int, target: str) -> torch.Tensor:
    out = linear(x)
    if lora is not None:
        lora.add_delta_(layer, target, x, out)
    return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                kv_cache: torch.Tensor, meta: AttentionMetadata, lora: LoRABatch | None) -> torch.Tensor:
        """x: the previous layer's output (not yet added), residual: the stream before it, which
        the residual adds update in place (each fused with the norm after it). Returns this
        layer's output, for the next layer or the final norm to add."""
        x = self.self_attn(self.input_layernorm(x, residual), cos_sin, kv_cache, meta, lora)
        return self.mlp(self.post_attention_layernorm(x, residual), lora)


class LlamaForCausalLM(nn.Module):
    """A decoder-only Llama-family model. kv_caches: [layers, 2, num_slots, kv_heads, head_dim]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                      config.rope_theta, config.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor,
                meta: AttentionMetadata, lora: LoRABatch | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] of the flattened tokens; `lora` adds per-token adapter deltas."""
        residual = self.embed_tokens(input_ids)
        x = torch.zeros_like(residual)  # the first layer's residual add adds nothing
        cos_sin = self.rotary.cos_sin(positions)
        lora = lora if lora is not None and lora.active else None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, residual, cos_sin, kv_cache, meta, lora)
        return self.norm(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_hf_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Adopt Hugging Face-named weights (model.layers.N.self_attn.q_proj.weight, ...), fusing
        q/k/v and gate/up, without copying the others. Raise KeyError naming a missing tensor,
        ValueError on a shape mismatch."""
        ours = fuse_hf_weights(tensors, self.config)
        expected = {k: v.shape for k, v in self.state_dict().items() if k != "lm_head.weight" or
                    not self.config.tie_word_embeddings}
        for name, shape in expected.items():
            if name not in ours:
                raise KeyError(name)
            if tuple(ours[name].shape) != tuple(shape):
                raise ValueError(f"{name}: expected shape {tuple(shape)}, file has {tuple(ours[name].shape)}")
        self.load_state_dict(ours, strict=False, assign=True)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight


def fuse_hf_weights(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename Hugging Face tensors to this model's names, concatenating q/k/v and gate/up."""
    ours = {"embed_tokens.weight": tensors["model.embed_tokens.weight"], "norm.weight": tensors["model.norm.weight"]}
    if not config.tie_word_embeddings:
        ours["lm_head.weight"] = tensors["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        hf, me = f"model.layers.{i}.", f"layers.{i}."
        ours[me + "self_attn.qkv_proj.weight"] = torch.cat([tensors[hf + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        if config.attention_bias:
            ours[me + "self_attn.qkv_proj.bias"] = torch.cat([tensors[hf + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        ours[me + "self_attn.o_proj.weight"] = tensors[hf + "self_attn.o_proj.weight"]
        ours[me + "mlp.gate_up_proj.weight"] = torch.cat([tensors[hf + "mlp.gate_proj.weight"],
                                                          tensors[hf + "mlp.up_proj.weight"]])
        ours[me + "mlp.down_proj.weight"] = tensors[hf + "mlp.down_proj.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            ours[me + f"{norm}.weight"] = tensors[hf + f"{norm}.weight"]
    return ours
