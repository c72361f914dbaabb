"""Attention over a paged KV cache, in plain PyTorch.

Each step's tokens arrive flattened ([T, heads, head_dim]) from many sequences. New keys and values
are written to their slots in the cache, then:
- with `--attention flex`, every row attends in one flex_attention call over the page table
  (layers/flex_paged.py); otherwise
- each sequence with one new token (decode) attends, in one batched call, to its context: on the
  CPU by a kernel that reads the paged cache in place (layers/paged_decode.py), elsewhere (or
  where the kernel cannot be built) gathered from the cache, padded to the longest and masked;
- each sequence with several new tokens (a prefill chunk) attends causally to its context: on an
  AVX-512 CPU all chunks at once by a kernel that reads the paged cache in place
  (layers/paged_prefill.py); elsewhere each on its own by SDPA with no padding, a fresh prompt
  over its own new keys and values, a chunk behind cached tokens over its context gathered once
  per layer, with a bottom-right causal mask.
Prefill attention is most of attention's cost in a simulation burst; batching it padded to the
longest prompt, as this file did first, cost 1.5x on mixed lengths and more on skewed ones. The
per-step index tensors are built once in `AttentionMetadata` and shared by every layer.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from scalesim.layers.flex_paged import FlexPlan, flex_paged_attention
from scalesim.layers.paged_decode import paged_decode
from scalesim.layers.paged_prefill import paged_prefill

KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # the prefill kernel's query and output dtypes


@dataclass
class PrefillChunk:
    """One sequence's run of new tokens: rows [start, end) of the step's flattened tokens.
    context_slots [C] (cached + new, in order) and mask [Q, C] are None for a fresh prompt."""

    start: int
    end: int
    context_slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    """Index tensors of one forward step.

    slot_mapping [T]: cache slot where each new token's K/V is written.
    decode_rows [D]: rows of the tokens of one-token sequences (None when every row is one);
    decode_block_tables [D, blocks] (int64, padded with block 0) and decode_lengths [D]: their
    contexts, for the in-place kernel; or, for the gather path, decode_slots [D, C]: their
    contexts' slots, padded with 0, and decode_mask [D, 1, 1, C].
    prefills: the sequences with several new tokens. For the in-place prefill kernel also
    prefill_block_tables [P, blocks] (int64, padded with block 0), prefill_lengths [P] (context
    length with the chunk), prefill_starts [P] and prefill_counts [P] (the chunk's rows); then
    the chunks carry no context slots or masks.
    flex: every row attends in one flex_attention call (layers/flex_paged.py) instead.
    """

    slot_mapping: torch.Tensor
    num_tokens: int
    decode_rows: torch.Tensor | None = None
    decode_block_tables: torch.Tensor | None = None
    decode_lengths: torch.Tensor | None = None
    block_size: int = 0
    decode_slots: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    prefill_block_tables: torch.Tensor | None = None
    prefill_lengths: torch.Tensor | None = None
    prefill_starts: torch.Tensor | None = None
    prefill_counts: torch.Tensor | None = None
    flex: FlexPlan | None = None  # with `--attention flex`: the step's block mask; nothing above but slot_mapping is set

    @property
    def num_decode(self) -> int:
        tensor = self.decode_lengths if self.decode_lengths is not None else self.decode_slots
        return 0 if tensor is None else tensor.shape[0]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Write k, v into the cache, attend q to each sequence's context; return [T, heads * head_dim].

    k_cache, v_cache: [num_slots, kv_heads, head_dim]. Keys and values are stored in the cache's
    dtype. On the CPU attention computes in float32 over the stored (rounded) keys and values, so
    a token's attention is the same math whether its context was computed in this step or read
    back, and a bf16 cache costs only the rounding of what it stores (the prefill kernel's AMX
    tile path, for a bf16 cache, also rounds the queries and the softmax weights to bf16 for its
    products); elsewhere it computes in the cache's dtype.
    """
    out_dtype, cache_dtype = q.dtype, k_cache.dtype
    compute_dtype = torch.float32 if k_cache.device.type == "cpu" else cache_dtype
    k, v = k.to(cache_dtype), v.to(cache_dtype)
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    num_heads, head_dim = q.shape[1], q.shape[2]
    gqa = num_heads != k.shape[1]
    in_place = meta.prefill_block_tables is not None  # the prefill kernel serves this step's chunks
    if in_place:
        # it reads queries and writes outputs in the model's dtype where it can (float32 or
        # bfloat16: no converted copies of them) and computes in float32
        q = q if q.dtype in KERNEL_DTYPES else q.to(torch.float32)
    else:
        q = q.to(compute_dtype)  # k and v are read back from the cache, or converted where SDPA takes them
        if meta.flex is not None:
            return flex_paged_attention(q, k_cache.to(compute_dtype), v_cache.to(compute_dtype), meta.flex, scale,
                                        gqa).to(out_dtype)
        if meta.num_decode == meta.num_tokens:
            return _decode(q, k_cache, v_cache, meta, scale, gqa).to(out_dtype)
    out = q.new_empty(meta.num_tokens, num_heads * head_dim)
    if meta.num_decode:
        decoded = _decode(q.index_select(0, meta.decode_rows).to(compute_dtype), k_cache, v_cache, meta, scale, gqa)
        out.index_copy_(0, meta.decode_rows, decoded.to(out.dtype))
    if in_place:
        paged_prefill(q.contiguous(), k_cache, v_cache, meta.prefill_block_tables, meta.prefill_lengths,
                      meta.prefill_starts, meta.prefill_counts, meta.block_size, scale, out.view(q.shape))
        return out.to(out_dtype)
    for chunk in meta.prefills:
        queries = q[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)              # [1, H, Q, D]
        if chunk.context_slots is None:
            keys, values = k[chunk.start:chunk.end].to(compute_dtype), v[chunk.start:chunk.end].to(compute_dtype)
        else:
            keys = k_cache.index_select(0, chunk.context_slots).to(compute_dtype)
            values = v_cache.index_select(0, chunk.context_slots).to(compute_dtype)
        attended = F.scaled_dot_product_attention(
            queries, keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
            attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scale, enable_gqa=gqa)
        out[chunk.start:chunk.end] = attended[0].transpose(0, 1).reshape(chunk.end - chunk.start, -1)
    return out.to(out_dtype)


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
            scale: float, gqa: bool) -> torch.Tensor:
    """One query per sequence against its context: [D, heads * head_dim]."""
    if meta.decode_slots is None:
        # the kernel runs on the CPU only, where attention computes in float32 (q is already float32)
        return paged_decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_lengths, meta.block_size,
                            scale).view(q.shape[0], -1)
    batch, context = meta.decode_slots.shape
    shape = (batch, context, k_cache.shape[1], k_cache.shape[2])
    slots = meta.decode_slots.view(-1)
    keys = k_cache.index_select(0, slots).view(shape).transpose(1, 2).to(q.dtype)
    values = v_cache.index_select(0, slots).view(shape).transpose(1, 2).to(q.dtype)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=meta.decode_mask, scale=scale,
                                         enable_gqa=gqa)
    return out.reshape(batch, -1)
