"""`scalesim microbench int8`: what int8 weights buy in speed on this CPU, against float32.

Two levels, each float32 against int8 in the same rounds, interleaved, medians compared with each
side's spread (max / min - 1 over the rounds) as the noise floor:
- `linears`: a chain of all of the model's linears (every layer's q/k/v, o, gate/up and down,
  then the output head) with distinct weights, so they stream from memory as in a real step, at
  1 to 512 rows: oneDNN's packed float32 (the engine's fp32 weights) against kernels/weight_only_linear.cpp.
  Random weights of the model's shapes; the value is the median of 5 chain runs.
- `engine`: the whole engine, `LLM(dtype="fp32")` against `LLM(quantization="int8")`: prefill of
  8 x 512-token prompts (tokens/s), and decode at batch 1 and 16 (tokens/s: 64 tokens minus 1,
  the prefill taken out as in engine_bench). Fresh random prompts every time, so no prefix is
  reused.
What int8 costs in output is `microbench accuracy --quantization int8`.
"""

import random
import statistics
import time
from dataclasses import dataclass, field

import torch

from scalesim.bench.engine_bench import random_prompts, time_generate
from scalesim.bench.provenance import provenance
from scalesim.layers.weight_only import PackedWeight
from scalesim.layers.linear import OneDNNPacked
from scalesim.llm import LLM
from scalesim.models.config import ModelConfig
from scalesim.models.registry import resolve_model

KINDS = ("fp32", "int8")
CHAIN_ROWS = (1, 4, 16, 64, 512)
CHAIN_REPEATS = 5
PREFILL_PROMPTS, PREFILL_TOKENS = 8, 512
DECODE_BATCHES = (1, 16)
DECODE_PROMPT_TOKENS, DECODE_TOKENS = 128, 64


def speedup(unit: str, base: float, other: float) -> float:
    """`other`'s speedup over `base` from two values in `unit`: a time ("s", lower is better) or a rate."""
    return base / other if unit == "s" else other / base


@dataclass
class Case:
    """One case's values per kind over the rounds: `kinds` is (baseline, other), and the summary's
    `speedup_key` holds the other's speedup over the baseline."""
    unit: str  # "s" or "tokens/s"
    kinds: tuple[str, str] = KINDS
    speedup_key: str = "int8_speedup"
    values: dict = field(init=False)

    def __post_init__(self) -> None:
        self.values = {k: [] for k in self.kinds}

    def summary(self) -> dict:
        median = {k: statistics.median(v) for k, v in self.values.items()}
        spread = {k: round(max(v) / min(v) - 1, 4) for k, v in self.values.items()}
        base, other = self.kinds
        return {"unit": self.unit, "values": self.values, "median": median, "spread": spread,
                self.speedup_key: round(speedup(self.unit, median[base], median[other]), 3)}


def linear_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of every linear of one forward pass, in order."""
    hidden, inter = config.hidden_size, config.intermediate_size
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    layer = [(qkv, hidden), (hidden, config.num_attention_heads * config.head_dim), (2 * inter, hidden), (hidden, inter)]
    return layer * config.num_hidden_layers + [(config.vocab_size, hidden)]


def chain_seconds(kernels: list, inputs: dict[int, torch.Tensor]) -> float:
    """Median seconds of CHAIN_REPEATS runs of the whole chain."""
    runs = []
    for _ in range(CHAIN_REPEATS):
        started = time.perf_counter()
        for kernel, in_features in kernels:
            kernel(inputs[in_features])
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def engine_cases(llm: LLM, rng: random.Random, vocab: int) -> dict[str, float]:
    prefill_s = time_generate(llm, random_prompts(rng, PREFILL_PROMPTS, PREFILL_TOKENS, vocab), 1)
    out = {f"prefill_{PREFILL_PROMPTS}x{PREFILL_TOKENS}": PREFILL_PROMPTS * PREFILL_TOKENS / prefill_s}
    for batch in DECODE_BATCHES:
        first_token_s = time_generate(llm, random_prompts(rng, batch, DECODE_PROMPT_TOKENS, vocab), 1)
        all_tokens_s = time_generate(llm, random_prompts(rng, batch, DECODE_PROMPT_TOKENS, vocab), DECODE_TOKENS)
        out[f"decode_b{batch}"] = batch * (DECODE_TOKENS - 1) / max(all_tokens_s - first_token_s, 1e-9)
    return out


def interleaved_rounds(chains: dict[str, list], engines: dict[str, LLM], cases: dict, chain_rows: tuple[int, ...],
                       rounds: int, rng: random.Random, config: ModelConfig, dtype: torch.dtype, speedup_key: str) -> None:
    """Fill `cases` (linears_<rows>_rows, then the engine cases) with `rounds` rounds of each kind
    (the keys of `chains` and `engines`), in alternating order; close the engines after."""
    kinds = list(chains)
    for llm in engines.values():  # first calls pay one-off costs (kernel loads, allocations)
        time_generate(llm, random_prompts(rng, 2, 64, config.vocab_size), 4)
    for r in range(rounds):
        order = kinds if r % 2 == 0 else kinds[::-1]
        for rows in chain_rows:
            inputs = {k: torch.randn(rows, k, dtype=dtype) for k in (config.hidden_size, config.intermediate_size)}
            for kind in order:
                cases[f"linears_{rows}_rows"].values[kind].append(round(chain_seconds(chains[kind], inputs), 7))
        for kind in order:
            for name, value in engine_cases(engines[kind], rng, config.vocab_size).items():
                cases[name].values[kind].append(round(value, 2))
        print(f"[round {r + 1}/{rounds}]", {n: c.summary()[speedup_key] for n, c in cases.items()}, flush=True)
    for llm in engines.values():
        llm.close()


def run_int8_bench(model: str = "smollm2-135m", rounds: int = 3, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = ModelConfig.from_folder(resolve_model(model))
    weights = [(torch.randn(n, k) * 0.02, k) for n, k in linear_shapes(config)]
    chains = {"fp32": [(OneDNNPacked(w, None), k) for w, k in weights],
              "int8": [(PackedWeight(w, None, "int8"), k) for w, k in weights]}
    del weights
    cases = {f"linears_{rows}_rows": Case("s") for rows in CHAIN_ROWS}
    engines = {"fp32": LLM(model, dtype="fp32", max_num_seqs=16, max_num_batched_tokens=4096, seed=seed),
               "int8": LLM(model, quantization="int8", max_num_seqs=16, max_num_batched_tokens=4096, seed=seed)}
    for name in (f"prefill_{PREFILL_PROMPTS}x{PREFILL_TOKENS}", *(f"decode_b{b}" for b in DECODE_BATCHES)):
        cases[name] = Case("tokens/s")
    interleaved_rounds(chains, engines, cases, CHAIN_ROWS, rounds, rng, config, torch.float32, "int8_speedup")
    return {"model": model, "rounds": rounds, "threads": torch.get_num_threads(), "measured_on": provenance(),
            "cases": {name: case.summary() for name, case in cases.items()}}


def case_labels(chain_rows: tuple[int, ...], decode_note: str = "") -> dict[str, str]:
    """The README's label of every case of a two-kind linears bench, in order."""
    return {**{f"linears_{rows}_rows": f"all linears, {rows} row{'s' * (rows > 1)} (ms)" for rows in chain_rows},
            f"prefill_{PREFILL_PROMPTS}x{PREFILL_TOKENS}": f"engine prefill, {PREFILL_PROMPTS} x {PREFILL_TOKENS} tokens (tokens/s)",
            **{f"decode_b{b}": f"engine decode, batch {b}{decode_note} (tokens/s)" for b in DECODE_BATCHES}}


CASE_LABELS = case_labels(CHAIN_ROWS)


def round_speedups(case: dict, kinds: tuple[str, str] = KINDS) -> list[float]:
    """The second kind's speedup over the first within each round of a summarized case (the two
    ran back to back there, so the machine's drift between rounds cancels)."""
    values = case["values"]
    return [speedup(case["unit"], base, other) for base, other in zip(values[kinds[0]], values[kinds[1]])]


def markdown_table(result: dict, labels: dict[str, str] = CASE_LABELS, kinds: tuple[str, str] = KINDS,
                   speedup_key: str = "int8_speedup") -> str:
    """The README's table of a `run_int8_bench` result (or of another bench with two kinds whose
    cases summarize the same way, given its labels, kinds and speedup key)."""
    def cell(case: dict, kind: str) -> str:
        scale = 1000.0 if case["unit"] == "s" else 1.0
        return f"{case['median'][kind] * scale:.1f}"

    base, other = kinds
    rows = [f"| case | {base} | {other} | {other} speedup | in each round | spread {base} / {other} |",
            "|---|---|---|---|---|---|"]
    for name, label in labels.items():
        case = result["cases"][name]
        spread = " / ".join(f"{case['spread'][k]:.0%}" for k in kinds)
        each = ", ".join(f"{r:.2f}" for r in round_speedups(case, kinds))
        rows.append(f"| {label} | {cell(case, base)} | {cell(case, other)} | **{case[speedup_key]:.2f}x** | {each} "
                    f"| {spread} |")
    return "\n".join(rows)
