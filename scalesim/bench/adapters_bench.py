"""Multi-LoRA decode throughput: 16 requests over 16 different adapters in one batch, against the
same batch without adapters and against the 16 requests run one adapter at a time.

All three use the same engine and fresh random prompts (no prefix reuse); decode throughput is
measured as in the engine bench: tokens after the first over (time for gen_len - time for 1).
"""

import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from tqdm import tqdm

from scalesim.bench.engine_bench import random_prompts, time_generate
from scalesim.llm import LLM
from scalesim.models.registry import cache_dir
from scalesim.weights.fixtures import make_random_adapters
from scalesim.weights.lora import LORA_TARGETS


@dataclass
class AdaptersBenchResult:
    model: str
    dtype: str
    adapters: int
    rank: int
    targets: list[str]
    prompt_len: int
    gen_len: int
    base_tokens_per_s: float
    lora_tokens_per_s: float
    sequential_tokens_per_s: float
    lora_vs_base_ratio: float
    batched_vs_sequential_ratio: float


def bench_adapters(model: str, count: int, rank: int) -> list[Path]:
    """`count` random rank-`rank` adapters over all targets, made once with peft and cached."""
    folder = cache_dir() / "bench" / f"adapters-{model}-r{rank}-n{count}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / f"adapter-{count - 1}" / "adapter_model.safetensors").exists():
            make_random_adapters(model, folder, count=count, rank=rank, alpha=2.0 * rank, seed=0)
    return [folder / f"adapter-{i}" for i in range(count)]


def run_adapters_bench(model: str, count: int = 16, rank: int = 16, prompt_len: int = 64, gen_len: int = 32,
                       dtype: str = "fp32", rounds: int = 3, seed: int = 0) -> AdaptersBenchResult:
    """Batched runs (base and LoRA) are interleaved over `rounds` and their medians compared, as
    this machine is shared and its speed drifts; the slow one-at-a-time run is done once."""
    rng = random.Random(seed)
    llm = LLM(model, dtype=dtype, max_num_seqs=count, max_num_batched_tokens=max(count * prompt_len, 512),
              max_lora_rank=max(rank, 16), seed=seed)
    names = []
    for i, path in enumerate(bench_adapters(model, count, rank)):
        llm.add_adapter(f"bench-{i}", str(path))
        names.append(f"bench-{i}")
    vocab = llm.engine.model_config.vocab_size

    def decode_tps(prompt_sets: list[list[list[int]]], adapter_sets: list[list[str | None]]) -> float:
        """Decode throughput of running each (prompts, adapters) batch in turn."""
        tokens, seconds = 0, 0.0
        for prompts, adapters in zip(prompt_sets, adapter_sets):
            first = time_generate(llm, random_prompts(rng, len(prompts), prompt_len, vocab), 1, adapters)
            whole = time_generate(llm, prompts, gen_len, adapters)
            tokens += len(prompts) * (gen_len - 1)
            seconds += whole - first
        return tokens / seconds

    time_generate(llm, random_prompts(rng, count, prompt_len, vocab), 4, names)  # warm-up
    batch = lambda: random_prompts(rng, count, prompt_len, vocab)  # noqa: E731
    base_runs, lora_runs = [], []
    for _ in range(rounds):
        base_runs.append(decode_tps([batch()], [[None] * count]))
        lora_runs.append(decode_tps([batch()], [names]))
    base, lora = statistics.median(base_runs), statistics.median(lora_runs)
    one_by_one = [[p] for p in batch()]
    sequential = decode_tps(list(tqdm(one_by_one, desc="one adapter at a time", leave=False)), [[n] for n in names])
    return AdaptersBenchResult(
        model=model, dtype=dtype, adapters=count, rank=rank, targets=list(LORA_TARGETS), prompt_len=prompt_len,
        gen_len=gen_len, base_tokens_per_s=round(base, 2), lora_tokens_per_s=round(lora, 2),
        sequential_tokens_per_s=round(sequential, 2), lora_vs_base_ratio=round(lora / base, 3),
        batched_vs_sequential_ratio=round(lora / sequential, 3))
