"""A pool of fixed-size KV pages under an exact byte budget, with reference counts.

The KV tensor is allocated once: [layers, 2, num_blocks * block_size, kv_heads, head_dim], so its
size is at most the budget. A block is free when its reference count is zero; a running sequence
and the radix cache each hold one reference to every block they use. The device tier's other
tenants (weights on the device, a step's stacked LoRA buffers) hold back a count of blocks with
`reserve`, so that everything on the device together never exceeds the budget.
"""

import heapq

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
        self.free_blocks: list[int] = list(range(self.num_blocks))  # a heap: lowest block first
        self.reserved_blocks = 0

    @property
    def nbytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    @property
    def device(self) -> torch.device:
        return self.kv_cache.device

    @property
    def num_free(self) -> int:
        """Blocks that a KV allocation may take now (free and not reserved)."""
        return len(self.free_blocks) - self.reserved_blocks

    @property
    def num_kv_blocks(self) -> int:
        """Blocks holding KV pages (referenced by a sequence or the radix cache)."""
        return self.num_blocks - len(self.free_blocks)

    def allocate(self, count: int) -> list[int] | None:
        """Take `count` free blocks (each with one reference), or None if fewer may be taken."""
        if count > self.num_free:
            return None
        blocks = [heapq.heappop(self.free_blocks) for _ in range(count)]
        for block in blocks:
            self.ref_counts[block] = 1
        return blocks

    def reserve(self, count: int) -> bool:
        """Hold back `count` free blocks for a tenant that is not KV; False if too few are free."""
        if count > self.num_free:
            return False
        self.reserved_blocks += count
        return True

    def unreserve(self, count: int) -> None:
        assert 0 <= count <= self.reserved_blocks, f"unreserve of {count} blocks, {self.reserved_blocks} reserved"
        self.reserved_blocks -= count

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
                heapq.heappush(self.free_blocks, block)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
