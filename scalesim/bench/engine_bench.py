"""Decode throughput of ScaleSim's engine against transformers' `generate`, same batch, same machine.

Both run the same random prompts (distinct per run, so no prefix is reused), fp32 by default,
greedy, with end-of-sequence ignored so every sequence generates exactly gen_len tokens, on the
engine's device (transformers' model and inputs are moved there, and a GPU is synchronized before
a timing ends). Decode
throughput is (batch * (gen_len - 1)) / (time for gen_len tokens - time for 1 token), which
takes the prefill out of both sides.
"""

import json
import logging
import random
import statistics
import time
from dataclasses import asdict, is_dataclass, dataclass
from pathlib import Path

import torch

from scalesim.config import DTYPES
from scalesim.llm import LLM
from scalesim.models.registry import resolve_model
from scalesim.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class EngineBenchResult:
    model: str
    dtype: str
    device: str
    batch: int
    prompt_len: int
    gen_len: int
    threads: int
    scalesim_tokens_per_s: float
    hf_tokens_per_s: float
    ratio: float
    rounds: int
    scalesim_prefill_s: float
    hf_prefill_s: float
    scalesim_total_s: float
    hf_total_s: float
    attention: str = "auto"


def random_prompts(rng: random.Random, batch: int, prompt_len: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(batch)]


def time_generate(llm: LLM, prompts: list[list[int]], gen_len: int, adapters: list[str | None] | None = None) -> float:
    """Seconds to generate exactly gen_len greedy tokens for every prompt in one batch."""
    params = SamplingParams(max_tokens=gen_len, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, adapters=adapters)
    elapsed = time.perf_counter() - started
    assert all(len(o.outputs[0].token_ids) == gen_len for o in outputs)
    return elapsed


def _time_hf(model, prompts: list[list[int]], gen_len: int) -> float:
    input_ids = torch.tensor(prompts, device=model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=gen_len,
                             min_new_tokens=gen_len, do_sample=False, pad_token_id=0)
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    elapsed = time.perf_counter() - started
    assert out.shape[1] == input_ids.shape[1] + gen_len
    return elapsed


def run_engine_bench(model: str, batch: int, prompt_len: int, gen_len: int, dtype: str = "fp32",
                     rounds: int = 3, seed: int = 0, attention: str = "auto") -> EngineBenchResult:
    """Both engines run interleaved for `rounds` rounds and the medians are compared, as this
    machine is shared and its speed drifts between runs."""
    from transformers import AutoModelForCausalLM

    rng = random.Random(seed)
    llm = LLM(model, dtype=dtype, max_num_seqs=max(batch, 1),
              max_num_batched_tokens=max(batch * prompt_len, 512), seed=seed, attention=attention)
    vocab = llm.engine.model_config.vocab_size
    device = llm.engine.config.device
    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model(model)), dtype=DTYPES[dtype]).to(device).eval()
    warm = random_prompts(rng, batch, prompt_len, vocab)
    time_generate(llm, warm, 4)
    _time_hf(hf, warm, 4)
    fresh = lambda: random_prompts(rng, batch, prompt_len, vocab)  # noqa: E731
    runs: dict[str, list[float]] = {"ours_prefill": [], "hf_prefill": [], "ours_total": [], "hf_total": []}
    for _ in range(rounds):
        runs["ours_prefill"].append(time_generate(llm, fresh(), 1))
        runs["hf_prefill"].append(_time_hf(hf, fresh(), 1))
        runs["ours_total"].append(time_generate(llm, fresh(), gen_len))
        runs["hf_total"].append(_time_hf(hf, fresh(), gen_len))
    ours_prefill, hf_prefill, ours_total, hf_total = (statistics.median(runs[k]) for k in runs)
    decoded = batch * (gen_len - 1)
    ours_tps = decoded / max(ours_total - ours_prefill, 1e-9)
    hf_tps = decoded / max(hf_total - hf_prefill, 1e-9)
    return EngineBenchResult(model=model, dtype=dtype, device=str(device), batch=batch, prompt_len=prompt_len,
                             gen_len=gen_len, threads=torch.get_num_threads(), scalesim_tokens_per_s=round(ours_tps, 2),
                             hf_tokens_per_s=round(hf_tps, 2), ratio=round(ours_tps / hf_tps, 3), rounds=rounds,
                             scalesim_prefill_s=round(ours_prefill, 3), hf_prefill_s=round(hf_prefill, 3),
                             scalesim_total_s=round(ours_total, 3), hf_total_s=round(hf_total, 3), attention=attention)


def write_result(result, out: str | None) -> None:
    text = json.dumps(asdict(result) if is_dataclass(result) else result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
