"""Time to first token of a request whose long prefix is cached, against the same request cold.

The first request computes a `prefix_len`-token prefix plus a private suffix; the second shares
the prefix with a different suffix and should reuse the prefix's pages. Reports both TTFTs,
their ratio, and how many prompt tokens the second request took from the cache.
"""

import random
import time
from dataclasses import dataclass

from scalesim.llm import LLM
from scalesim.sampling_params import SamplingParams


@dataclass
class PrefixBenchResult:
    model: str
    prefix_len: int
    suffix_len: int
    cold_ttft_s: float
    warm_ttft_s: float
    ttft_ratio: float
    warm_cached_tokens: int


def run_prefix_bench(model: str, prefix_len: int, suffix_len: int, seed: int = 0) -> PrefixBenchResult:
    rng = random.Random(seed)
    llm = LLM(model, seed=seed)
    vocab = llm.engine.model_config.vocab_size
    tokens = lambda n: [rng.randrange(100, vocab) for _ in range(n)]  # noqa: E731
    params = SamplingParams(max_tokens=1, temperature=0)
    llm.generate([tokens(32)], params)  # warm-up, unrelated tokens
    prefix = tokens(prefix_len)
    ttfts, cached = [], 0
    for _ in range(2):
        started = time.perf_counter()
        out = llm.generate([prefix + tokens(suffix_len)], params)[0]
        ttfts.append(time.perf_counter() - started)
        cached = out.num_cached_tokens
    return PrefixBenchResult(model=model, prefix_len=prefix_len, suffix_len=suffix_len,
                             cold_ttft_s=round(ttfts[0], 4), warm_ttft_s=round(ttfts[1], 4),
                             ttft_ratio=round(ttfts[1] / ttfts[0], 4), warm_cached_tokens=cached)
