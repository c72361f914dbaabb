"""A pool of fixed-size KV pages under an exact byte budget, with reference counts.

The KV tensor is allocated once: [layers, 2, num_blocks * block_size, kv_heads, head_dim], so its
size is at most the budget. A block is free when its reference count is zero; a running sequence
and the radix cache each hold one reference to every block they use.
"""

from collections import deque

import torch

from scalesim.errors import RequestTooLargeError
from scalesim.models.config import ModelConfig


class BlockPool:
    def __init__(self, config: ModelConfig, budget_nbytes: int, block_size_tokens: int,
                 dtype: torch.dtype, device: str) -> None:
        self.block_size = block_size_tokens
        element_nbytes = torch.empty((), dtype=dtype).element_size()
        self.block_nbytes = config.kv_bytes_per_token * element_nbytes * block_size_tokens
        self.num_blocks = budget_nbytes // self.block_nbytes
        if self.num_blocks < 1:
            raise RequestTooLargeError(
                f"KV budget of {budget_nbytes} bytes holds no page (one page is {self.block_nbytes} bytes)")
        self.kv_cache = torch.zeros(
            config.num_hidden_layers, 2, self.num_blocks * block_size_tokens,
            config.num_key_value_heads, config.head_dim, dtype=dtype, device=device)
        self.ref_counts = [0] * self.num_blocks
        self.free_blocks: deque[int] = deque(range(self.num_blocks))

    @property
    def nbytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def allocate(self, count: int) -> list[int] | None:
        """Take `count` free blocks (each with one reference), or None if there are fewer free."""
        if count > len(self.free_blocks):
            return None
        blocks = [self.free_blocks.popleft() for _ in range(count)]
        for block in blocks:
            self.ref_counts[block] = 1
        return blocks

    def incref(self, blocks: list[int]) -> None:
        for block in blocks:
            assert self.ref_counts[block] > 0, f"incref of free block {block}"
            self.ref_counts[block] += 1

    def decref(self, blocks: list[int]) -> None:
        """Drop one reference from each block; blocks reaching zero return to the free list."""
        for block in blocks:
            assert self.ref_counts[block] > 0, f"decref of free block {block}"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
