"""`scalesim microbench profile`: where an engine step's time goes, by `torch.profiler`.

Two steps of the shapes a simulation burst has: a prefill-heavy step (8 prompts of 512 tokens,
half of them behind a cached 256-token prefix, one token each) and a decode run at batch 16
(128-token prompts, 32 new tokens). Each is run once to warm up (new shapes make oneDNN build
its kernels), once timed (`wall_s`) and once profiled; the summary lists the top ops by self CPU
time with their share. (The files committed before profile-bf16-amx.json timed the warm-up run.)
"""

import random
import time
from dataclasses import dataclass, field

from torch.profiler import ProfilerActivity, profile

from scalesim.bench.engine_bench import random_prompts
from scalesim.bench.provenance import provenance
from scalesim.llm import LLM
from scalesim.sampling_params import SamplingParams

TOP_OPS = 12


@dataclass
class OpShare:
    op: str
    self_cpu_ms: float
    share: float
    calls: int


@dataclass
class StepProfile:
    name: str
    wall_s: float
    profiled_wall_s: float
    tokens: int
    ops: list[OpShare]


@dataclass
class ProfileBenchResult:
    model: str
    dtype: str
    threads: int
    steps: list[StepProfile]
    quantization: str = "none"
    measured_on: dict = field(default_factory=provenance)


def _summary(prof) -> list[OpShare]:
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [OpShare(e.key, round(e.self_cpu_time_total / 1e3, 1), round(e.self_cpu_time_total / total, 4), e.count)
            for e in events[:TOP_OPS]]


def run_profile_bench(model: str, dtype: str, seed: int = 0, quantization: str = "none") -> ProfileBenchResult:
    rng = random.Random(seed)
    llm = LLM(model, dtype=dtype, max_num_seqs=64, max_num_batched_tokens=4096, kv_cache_memory="2GiB", seed=seed,
              quantization=quantization)
    vocab = llm.engine.model_config.vocab_size

    def prompts(count: int, length: int, prefix: list[int] | None = None) -> list[list[int]]:
        prefix = prefix or []
        return [prefix + p for p in random_prompts(rng, count, length - len(prefix), vocab)]

    shared = random_prompts(rng, 1, 256, vocab)[0]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    decode = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    llm.generate([shared + [5]], one)  # the shared prefix is cached from here on
    cases = {"prefill_8x512_half_cached": (lambda: llm.generate(prompts(4, 512) + prompts(4, 512, shared), one), 3072),
             "decode_b16": (lambda: llm.generate(prompts(16, 128), decode), 16 * 32)}
    steps = []
    for name, (run, tokens) in cases.items():
        run()
        started = time.perf_counter()
        run()
        wall_s = time.perf_counter() - started
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        steps.append(StepProfile(name, round(wall_s, 3), round(time.perf_counter() - started, 3), tokens,
                                 _summary(prof)))
    threads = llm.engine.runner.threads.threads if llm.engine.runner.threads is not None else 0
    return ProfileBenchResult(model=model, dtype=llm.engine.config.dtype, threads=threads, steps=steps,
                              quantization=llm.engine.config.quantization)
