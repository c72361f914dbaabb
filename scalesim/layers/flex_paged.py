"""Paged attention as one flex_attention call per layer: the candidate for CUDA (`--attention flex`).

Every new token of a step, prefill and decode alike, is one query row; the keys and values are
the whole paged cache seen as one sequence of slots (a view, nothing copied). A block mask, built
once per step from the block tables and shared by every layer, sends each tile of Q_TILE query
rows only to the pages of its rows' sequences, so no context is gathered into a new tensor; a
mask function keeps, for each row, the slots its own sequence holds at positions up to its own
(causal; a page the prefix cache shares between sequences is seen by each of them).

On CUDA flex_attention is compiled (Triton, with 16 x 16 tiles, which divide the mask's) and
visits only the listed pages; the per-step sizes are marked dynamic so that one kernel serves
every step. The mask's tensors span the whole pool ([sequences, pool pages] and [row tiles, pool
pages], int32), refilled each step: small for the default pool, hundreds of MB on an 80 GB one
(not yet compacted). Elsewhere it runs
PyTorch's eager reference, which scores every row against every slot of the cache: correct and
used by the tests on small caches, never fast. Whether it beats gathering each context (the
default on CUDA) is for a GPU run to measure (scripts/device_check.sh).
"""

from dataclasses import dataclass
from functools import cache

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from scalesim.device_tensors import device_tensor, to_device

Q_TILE = 16  # query rows per tile of the block mask (the smallest tile flex_attention's kernel takes)


@dataclass
class SequenceRows:
    """One sequence's rows in a step: rows [start, start + count) hold its tokens at positions
    [position, position + count); `table` is its block table (enough pages for them)."""

    start: int
    count: int
    position: int
    table: list[int]


@dataclass
class FlexPlan:
    block_mask: BlockMask


def available(device: torch.device, block_size: int) -> bool:
    """Compiled flex attention serves this device and page size (a page is one key tile of at
    least 16 slots); the eager reference serves any, slowly."""
    return device.type == "cuda" and block_size % 16 == 0


def plan(sequences: list[SequenceRows], num_tokens: int, block_size: int, num_slots: int,
         device: torch.device) -> FlexPlan:
    """The step's block mask, from each sequence's rows, positions and block table."""
    num_blocks = num_slots // block_size
    row_seq = torch.empty(num_tokens, dtype=torch.int32)
    row_pos = torch.empty(num_tokens, dtype=torch.int32)
    seq_ids, blocks, logical = [], [], []
    tiles: list[set[int]] = [set() for _ in range(-(-num_tokens // Q_TILE))]
    for i, s in enumerate(sequences):
        row_seq[s.start:s.start + s.count] = i
        row_pos[s.start:s.start + s.count] = torch.arange(s.position, s.position + s.count, dtype=torch.int32)
        pages = s.table[:-(-(s.position + s.count) // block_size)]
        seq_ids += [i] * len(pages)
        blocks += pages
        logical += range(len(pages))
        for tile in range(s.start // Q_TILE, (s.start + s.count - 1) // Q_TILE + 1):
            last_row = min(s.start + s.count, (tile + 1) * Q_TILE) - 1  # causal: up to the tile's last row
            tiles[tile].update(pages[:(s.position + last_row - s.start) // block_size + 1])
    # for each sequence, the logical index of each pool block it holds (-1: not its page)
    page_of = torch.full((len(sequences), num_blocks), -1, dtype=torch.int32, device=device)
    page_of[device_tensor(seq_ids, device, torch.long), device_tensor(blocks, device, torch.long)] = \
        device_tensor(logical, device, torch.int32)
    # flex_attention's kv_indices are [1, 1, tiles, every pool block]: row t lists tile t's pages
    # first; the rest of the row is never read. Filled on the device from the listed pages alone.
    tile_ids, columns, pages_listed = [], [], []
    for tile, pages in enumerate(tiles):
        tile_ids += [tile] * len(pages)
        columns += range(len(pages))
        pages_listed += sorted(pages)
    kv_indices = torch.zeros(1, 1, len(tiles), num_blocks, dtype=torch.int32, device=device)
    kv_indices[0, 0, device_tensor(tile_ids, device, torch.long), device_tensor(columns, device, torch.long)] = \
        device_tensor(pages_listed, device, torch.int32)
    kv_num_blocks = device_tensor([[[len(t) for t in tiles]]], device, torch.int32)
    row_seq, row_pos = to_device(row_seq, device), to_device(row_pos, device)
    if device.type == "cuda":  # sizes that change every step: one compiled kernel for all of them
        for tensor in (row_seq, row_pos, page_of):
            torch._dynamo.mark_dynamic(tensor, 0)

    def mask_mod(b, h, q_idx, kv_idx):
        page = page_of[row_seq[q_idx], kv_idx // block_size]
        return (page >= 0) & (page * block_size + kv_idx % block_size <= row_pos[q_idx])

    block_mask = BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=(Q_TILE, block_size),
                                          mask_mod=mask_mod, seq_lengths=(num_tokens, num_slots),
                                          compute_q_blocks=False)  # forward only: no backward's index
    return FlexPlan(block_mask)


@cache
def _compiled():
    return torch.compile(flex_attention, dynamic=True)


def flex_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, flex: FlexPlan,
                         scale: float, gqa: bool) -> torch.Tensor:
    """q [T, heads, head_dim] against the cache [slots, kv_heads, head_dim] under the step's plan:
    [T, heads * head_dim]."""
    compiled = q.device.type == "cuda"
    attend = _compiled() if compiled else flex_attention
    # the kernel's tiles must divide the mask's (16 rows by one page): its defaults (128 x 128 or
    # 128 x 32) would make compiling fail
    options = {"BLOCK_M": Q_TILE, "BLOCK_N": 16} if compiled else None
    out = attend(q.transpose(0, 1).unsqueeze(0), k_cache.permute(1, 0, 2).unsqueeze(0),
                 v_cache.permute(1, 0, 2).unsqueeze(0), block_mask=flex.block_mask, scale=scale, enable_gqa=gqa,
                 kernel_options=options)
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)
