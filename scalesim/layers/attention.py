"""Attention over a paged KV cache, in plain PyTorch.

Each step's tokens arrive flattened ([T, heads, head_dim]) from many sequences. New keys and values
are written to their slots in the cache; each sequence's whole context is gathered from its slots
and attended with scaled-dot-product attention. The per-step index tensors are built once in
`AttentionMetadata` and shared by every layer.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Index tensors of one forward step.

    slot_mapping [T]: cache slot where each new token's K/V is written.
    context_slots [B, C]: slots of each sequence's full context (cached + new), padded with 0.
    mask [B, 1, Q, C]: True where query q of sequence b may attend to context position c.
    query_index [T]: row of each new token in the padded [B * Q] query layout.
    """

    slot_mapping: torch.Tensor
    context_slots: torch.Tensor
    mask: torch.Tensor
    query_index: torch.Tensor
    max_query_len: int

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Write k, v into the cache, attend q to each sequence's context; return [T, heads * head_dim].

    k_cache, v_cache: [num_slots, kv_heads, head_dim]. Attention runs in the cache's dtype (on CPU
    a float32 cache under bfloat16 weights, as PyTorch's CPU attention is slow in bfloat16).
    """
    out_dtype, cache_dtype = q.dtype, k_cache.dtype
    q, k, v = q.to(cache_dtype), k.to(cache_dtype), v.to(cache_dtype)
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    batch, max_q = meta.context_slots.shape[0], meta.max_query_len
    num_heads, head_dim = q.shape[1], q.shape[2]
    slots = meta.context_slots.view(-1)
    context_shape = (batch, meta.context_slots.shape[1], k_cache.shape[1], head_dim)
    keys = k_cache.index_select(0, slots).view(context_shape).transpose(1, 2)
    values = v_cache.index_select(0, slots).view(context_shape).transpose(1, 2)
    if meta.is_decode_only:
        queries = q.unsqueeze(2)
    else:
        padded = q.new_zeros(batch * max_q, num_heads, head_dim)
        padded.index_copy_(0, meta.query_index, q)
        queries = padded.view(batch, max_q, num_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.mask, scale=scale,
                                         enable_gqa=num_heads != keys.shape[1])
    out = out.transpose(1, 2).reshape(batch * max_q, num_heads * head_dim).to(out_dtype)
    return out if meta.is_decode_only else out.index_select(0, meta.query_index)
