import os
import random

import pytest
import torch
from hypothesis import settings

# Property tests draw the same cases on every machine (CI included), so a run here predicts CI's;
# a case found failing once is kept as an @example next to its test.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def hermetic_cache(tmp_path_factory):
    """Every test run builds its own model cache, so no stale folder from an older run is used."""
    os.environ["SCALESIM_CACHE_DIR"] = str(tmp_path_factory.mktemp("scalesim-cache"))
    yield


@pytest.fixture(autouse=True)
def seeded():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_llm(hermetic_cache):
    from scalesim import LLM
    return LLM("tiny-random", kv_cache_memory="16MiB", block_size_tokens=4, max_num_batched_tokens=256)


def random_prompt(rng: random.Random, length: int, vocab: int = 500) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(length)]
