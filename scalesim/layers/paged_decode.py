"""Decode attention that reads the paged KV cache in place, by a small C++ kernel
(kernels/paged_decode.cpp), as vLLM's CPU backend does with its own.

The plain-PyTorch path gathers every decoding sequence's whole context out of the cache with
`index_select` in every layer, then runs SDPA over the copy. At batch 16 and 1,024 cached tokens
that was 4.4 ms of gather and 8.6 ms of SDPA per layer on this 2-core machine (development
measurement), about 390 ms of a decode step against 70 ms of matmuls. The kernel reads each key
and value row once for the group of query heads that share it.

The kernel is compiled on first use (layers/kernel_build.py). Where it cannot be built,
`available()` is False and attention keeps the gather path.
"""

import torch

from scalesim.layers import kernel_build

SOURCE = "paged_decode.cpp"


def available() -> bool:
    """Build (once per process, and once per machine on disk) and load the kernel; False if it
    cannot be built here."""
    return kernel_build.load(SOURCE)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """q [B, heads, head_dim] against each sequence's first context_lens[b] cached tokens, found
    through block_tables [B, blocks] (int64); q float32, the caches float32 or bfloat16; returns
    [B, heads, head_dim] in float32."""
    return torch.ops.scalesim.paged_decode(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)
