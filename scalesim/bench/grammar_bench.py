"""What structured output costs: batched decode with every sequence held to a JSON schema against
the same batch unconstrained, on the same engine, interleaved over rounds.

The prompts ask for JSON, and each sequence generates exactly gen_len tokens (end of sequence is
ignored, so a schema that is complete early keeps its mask computed every step): the ratio is
the per-token cost of computing the mask, applying it and advancing the matcher, with nothing
else different. Decode throughput is measured as in the engine bench: tokens after the first
over (time for gen_len - time for 1).
"""

import statistics
import time
from dataclasses import dataclass

from scalesim.engine.grammar import json_schema_grammar
from scalesim.llm import LLM, render_chat
from scalesim.sampling_params import SamplingParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "mood": {"enum": ["happy", "sad", "angry", "calm"]},
    "plan": {"type": "array", "items": {"type": "object", "properties": {
        "hour": {"type": "integer", "minimum": 0, "maximum": 23}, "action": {"type": "string"}},
        "required": ["hour", "action"]}}},
    "required": ["name", "mood", "plan"]}


@dataclass
class GrammarBenchResult:
    model: str
    dtype: str
    batch: int
    gen_len: int
    rounds: int
    free_tokens_per_s: list[float]
    schema_tokens_per_s: list[float]
    free_median_tokens_per_s: float
    schema_median_tokens_per_s: float
    schema_vs_free_ratio: float
    noise_floor: float  # (max - min) / median of the unconstrained rounds


def run_grammar_bench(model: str, batch: int = 16, gen_len: int = 64, dtype: str = "fp32",
                      rounds: int = 3) -> GrammarBenchResult:
    llm = LLM(model, dtype=dtype, max_num_seqs=batch)
    tokenizer = llm.engine.tokenizer
    prompts = [render_chat(tokenizer, [{"role": "user", "content": (
        f"Agent {i}: describe your plan for today as JSON with your name, mood and a plan of hours and "
        "actions.")}]) for i in range(batch)]
    grammar = json_schema_grammar(SCHEMA)

    def seconds(tokens: int, constrained: bool) -> float:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True,
                                grammar=grammar if constrained else None)
        started = time.perf_counter()
        outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - started
        assert all(len(o.outputs[0].token_ids) == tokens for o in outputs)
        return elapsed

    def decode_tps(constrained: bool) -> float:
        return batch * (gen_len - 1) / (seconds(gen_len, constrained) - seconds(1, constrained))

    decode_tps(True)  # warm-up: kernels, the grammar tokenizer
    free, schema = [], []
    for r in range(rounds):
        for constrained in ((False, True) if r % 2 == 0 else (True, False)):
            (schema if constrained else free).append(round(decode_tps(constrained), 2))
    free_median, schema_median = statistics.median(free), statistics.median(schema)
    return GrammarBenchResult(
        model=model, dtype=dtype, batch=batch, gen_len=gen_len, rounds=rounds, free_tokens_per_s=free,
        schema_tokens_per_s=schema, free_median_tokens_per_s=free_median, schema_median_tokens_per_s=schema_median,
        schema_vs_free_ratio=round(schema_median / free_median, 3),
        noise_floor=round((max(free) - min(free)) / free_median, 3))
