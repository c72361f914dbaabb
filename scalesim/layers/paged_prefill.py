"""Prefill attention that reads the paged KV cache in place, by a C++ kernel
(kernels/paged_prefill.cpp): every chunk of new tokens, fresh prompt or behind a cached prefix,
attends causally to its sequence's cached rows through its block table, with no gather of the
prefix, no mask tensor and no float32 copy of bfloat16 keys and values.

Built on first use (layers/kernel_build.py); AVX-512 CPUs and head sizes 32, 64, 96, 128 only.
Where it is not `available`, attention keeps its SDPA path. On CPUs with AMX-BF16 a bfloat16
cache takes the tile path (kernels/paged_prefill_amx.h, `tiles`): 2.3x the vector path's speed on
8 x 512 fresh tokens (5.8 against 13.6 ms per layer, development measurement). Queries and
outputs are float32 or bfloat16, as the model computes; the sums are float32 either way.
"""

import torch

from scalesim.layers import kernel_build

SOURCE = "paged_prefill.cpp"


def available(head_dim: int) -> bool:
    """Whether the kernel serves this head size on this machine (built on the first call)."""
    return kernel_build.load(SOURCE) and bool(torch.ops.scalesim.paged_prefill_supported(head_dim))


def tiles(head_dim: int) -> bool:
    """Whether a bfloat16 cache of this head size takes the AMX tile path on this machine
    (kernels/paged_prefill_amx.h): queries and weights rounded to bfloat16 for the products."""
    return available(head_dim) and bool(torch.ops.scalesim.paged_prefill_tiles(head_dim))


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, query_starts: torch.Tensor, query_counts: torch.Tensor,
                  block_size: int, scale: float, out: torch.Tensor, use_tiles: bool = True) -> None:
    """For each chunk c: rows query_starts[c] .. + query_counts[c] of q [T, heads, head_dim]
    (float32 or bfloat16, contiguous) are the last query_counts[c] of context_lens[c] cached
    tokens, found through block_tables[c] (int64); write their attention into the same rows of
    out (like q, same dtype).
    A bfloat16 cache takes the tile path where `tiles` says so, unless `use_tiles` is False."""
    if not kernel_build.load(SOURCE):
        raise RuntimeError("the paged prefill kernel is not available here (see `available`)")
    torch.ops.scalesim.paged_prefill(q, k_cache, v_cache, block_tables, context_lens, query_starts, query_counts,
                                     block_size, scale, out, use_tiles)
