"""Rotary position embedding (rotate-half convention) with the config's scaling."""

import math

import torch
from torch import nn

from scalesim.errors import ModelLoadError
from scalesim.layers.fused import rotary_


def inverse_frequencies(head_dim: int, theta: float, rope_scaling: dict | None) -> torch.Tensor:
    """The per-pair rotation frequencies, adjusted for 'linear' or 'llama3' scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not rope_scaling:
        return inv_freq
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind == "linear":
        return inv_freq / rope_scaling["factor"]
    if kind == "llama3":
        factor = rope_scaling["factor"]
        low_freq_factor = rope_scaling["low_freq_factor"]
        high_freq_factor = rope_scaling["high_freq_factor"]
        old_context_len = rope_scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ModelLoadError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Applies RoPE to query and key heads at given absolute positions. In the rotate-half
    convention both halves of a head turn by the same angles, so the tables hold one half."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, rope_scaling: dict | None) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, theta, rope_scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, head_dim / 2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotation table rows for `positions` [T], each [T, head_dim / 2]; once per step."""
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)

    @staticmethod
    def apply_(q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Rotate q [T, heads, head_dim] and k [T, kv_heads, head_dim] in place, in float32."""
        rotary_(q, k, *cos_sin)
