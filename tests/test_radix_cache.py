"""The radix prefix cache: sharing, isolation by namespace, splitting (eviction is the memory
layer's: see test_memory_kv.py)."""

import pytest
import torch

from scalesim.engine.block_pool import BlockPool
from scalesim.engine.radix_cache import RadixCache
from scalesim.models.config import ModelConfig

PAGE = 4


def _config() -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=8, intermediate_size=16,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                       rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
                       tie_word_embeddings=False, attention_bias=False)


@pytest.fixture
def cache() -> RadixCache:
    config = _config()
    block_nbytes = config.kv_bytes_per_token * 4 * PAGE
    pool = BlockPool(config, 32 * block_nbytes, PAGE, torch.float32, "cpu")
    return RadixCache(pool)


def _store(cache: RadixCache, tokens: list[int], namespace: str = "") -> list[int]:
    """What a finished request does: allocate pages, publish them, drop its own reference."""
    blocks = cache.pool.allocate(len(tokens) // PAGE)
    cache.insert(namespace, tokens, blocks)
    cache.pool.decref(blocks)
    return blocks


def test_inserted_pages_are_matched_page_aligned(cache):
    blocks = _store(cache, list(range(12)))
    match = cache.match_prefix("", list(range(10)))
    assert match.blocks == blocks[:2]


def test_identical_prefix_of_two_agents_is_stored_once(cache):
    system = list(range(8))
    _store(cache, system + [50, 51, 52, 53])
    before = cache.num_cached_blocks
    _store(cache, system + [60, 61, 62, 63])
    assert cache.num_cached_blocks == before + 1
    assert cache.pool.num_free == cache.pool.num_blocks - cache.num_cached_blocks


def test_a_namespace_never_matches_another_namespaces_pages(cache):
    _store(cache, list(range(8)), namespace="model-a")
    assert cache.match_prefix("model-b", list(range(8))).blocks == []
    assert len(cache.match_prefix("model-a", list(range(8))).blocks) == 2


def test_partial_match_splits_a_node_at_a_page_boundary(cache):
    _store(cache, list(range(12)))
    match = cache.match_prefix("", list(range(8)) + [99, 99, 99, 99])
    assert len(match.blocks) == 2
    assert len(cache.match_prefix("", list(range(12))).blocks) == 3
