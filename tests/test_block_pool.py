"""The paged KV pool honours its byte budget exactly and counts references."""

import pytest
import torch

from scalesim.engine.block_pool import BlockPool
from scalesim.errors import RequestTooLargeError
from scalesim.models.config import ModelConfig

CONFIG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
                     tie_word_embeddings=False, attention_bias=False)


@pytest.mark.parametrize("budget", [10_000, 123_457, 1 << 20])
def test_pool_never_exceeds_its_byte_budget_and_wastes_less_than_a_page(budget):
    pool = BlockPool(CONFIG, budget, 8, torch.float32, "cpu")
    assert pool.nbytes <= budget
    assert budget - pool.nbytes < pool.block_nbytes


def test_budget_below_one_page_is_a_clear_error():
    with pytest.raises(RequestTooLargeError, match="holds no page"):
        BlockPool(CONFIG, 100, 8, torch.float32, "cpu")


def test_a_block_returns_to_the_free_list_only_when_its_last_reference_drops():
    pool = BlockPool(CONFIG, 1 << 20, 8, torch.float32, "cpu")
    blocks = pool.allocate(2)
    free = pool.num_free
    pool.incref(blocks)
    pool.decref(blocks)
    assert pool.num_free == free
    pool.decref(blocks)
    assert pool.num_free == free + 2
    assert pool.allocate(pool.num_blocks + 1) is None
