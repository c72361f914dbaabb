"""`--attention flex`: a step's attention as one flex_attention call over the page table
(layers/flex_paged.py), the candidate for CUDA. Here it runs PyTorch's eager reference, which
applies the mask function but not the block sparsity, so the sparsity (which pages each tile of
query rows visits on a GPU) is checked apart against the mask it must cover."""

import random

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from scalesim import LLM, SamplingParams
from scalesim.layers import flex_paged
from tests.conftest import random_prompt


def test_flex_attention_gives_the_tokens_and_logits_of_the_default_path():
    """Fresh prompts of one to many pages, prompts behind a cached prefix (pages shared by the
    prefix cache), prefill chunks split by a small step budget, and decode steps mixed with them."""
    rng = random.Random(0)
    shared = random_prompt(rng, 40)
    prompts = [random_prompt(rng, n) for n in (5, 23, 61)] + [shared + random_prompt(rng, n) for n in (9, 17)]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    tokens, logits = {}, {}
    for attention in ("gather", "flex"):
        llm = LLM("tiny-random", device="cpu", dtype="fp32", kv_cache_memory="256KiB", block_size_tokens=4,
                  max_num_batched_tokens=48, attention=attention)
        llm.generate([shared], greedy)
        tokens[attention] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        logits[attention] = llm.prompt_logits(shared + [5, 6, 7, 8, 9])
    assert tokens["flex"] == tokens["gather"]
    assert logits["flex"].shape == logits["gather"].shape
    assert (logits["flex"] - logits["gather"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("seed", range(5))
def test_each_tile_of_rows_visits_exactly_the_pages_its_rows_attend_to(seed):
    rng = random.Random(seed)
    block_size, num_blocks = 4, 24
    shared = rng.sample(range(num_blocks), 3)  # pages a prefix cache shares between sequences
    sequences, row = [], 0
    for _ in range(rng.randint(1, 6)):
        position, count = rng.randint(0, 20), rng.choice([1, 1, rng.randint(2, 25)])
        pages = -(-(position + count) // block_size)
        prefix = shared[:rng.randint(0, 3)]  # a table never holds a page twice
        table = (prefix + [b for b in rng.sample(range(num_blocks), num_blocks) if b not in prefix])[:pages]
        sequences.append(flex_paged.SequenceRows(row, count, position, table))
        row += count
    plan = flex_paged.plan(sequences, row, block_size, num_blocks * block_size, torch.device("cpu"))
    mask = create_mask(plan.block_mask.mask_mod, 1, 1, row, num_blocks * block_size, device="cpu")[0, 0]
    tiles = -(-row // flex_paged.Q_TILE)
    padded = torch.zeros(tiles * flex_paged.Q_TILE, num_blocks * block_size, dtype=torch.bool)
    padded[:row] = mask
    needed = padded.view(tiles, flex_paged.Q_TILE, num_blocks, block_size).any(dim=3).any(dim=1)
    visited = torch.zeros(tiles, num_blocks, dtype=torch.bool)
    bm = plan.block_mask
    for tile in range(tiles):
        visited[tile, bm.kv_indices[0, 0, tile, :bm.kv_num_blocks[0, 0, tile]].long()] = True
    assert torch.equal(visited, needed)
    for s in sequences:  # and every row sees its own context, causally, and nothing else
        for r in range(s.start, s.start + s.count):
            position = s.position + r - s.start
            slots = {s.table[p // block_size] * block_size + p % block_size for p in range(position + 1)}
            assert set(mask[r].nonzero().flatten().tolist()) == slots


def test_an_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="attention"):
        LLM("tiny-random", device="cpu", attention="paged-magic")
