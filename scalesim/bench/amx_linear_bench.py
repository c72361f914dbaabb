"""`scalesim microbench amx-linears`: the AMX tile linear (layers/amx_linear.py) against oneDNN's
packed bfloat16 inner product, the engine's other kernel, on this CPU.

Two levels, each kernel in the same rounds, interleaved, medians compared with each side's spread
(max / min - 1 over the rounds) as the noise floor:
- `linears`: a chain of all of the model's linears with distinct weights (as in int8_bench), at 1
  to 512 rows: oneDNN's packed weight against the tile kernel called directly, at every row count
  (no hand-over), which is what `SMALL_ROWS` is chosen from. The value is the median of 5 runs.
- `engine`: `LLM(dtype="bf16")` built with the tiles (the default here) and inside
  `amx_linear.turned_off()` (oneDNN only): prefill of 8 x 512-token prompts, decode at batch 1
  and 16, as int8_bench measures them, with speculation off: the two kernels round differently,
  so greedy texts part, and with them how many drafted tokens are kept, which would move the
  decode rates by more than the kernels do. What the tiles give the default engine (speculation
  on) is the feed trace of `microbench peer`.
"""

import random

import torch

from scalesim.bench.int8_bench import DECODE_BATCHES, PREFILL_PROMPTS, PREFILL_TOKENS, Case, case_labels, \
    interleaved_rounds, linear_shapes
from scalesim.bench.int8_bench import markdown_table as int8_table
from scalesim.bench.provenance import provenance
from scalesim.layers import amx_linear
from scalesim.layers.linear import OneDNNPacked
from scalesim.llm import LLM
from scalesim.models.config import ModelConfig
from scalesim.models.registry import resolve_model

KINDS = ("onednn", "tiles")
CHAIN_ROWS = (1, 16, 48, 80, 128, 256, 512)


class TileChainLink:
    """One linear of the chain on the tile kernel, whatever the rows (no hand-over to oneDNN)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.packed, self.out_features = amx_linear.pack(weight), weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return amx_linear.amx_linear(x, self.packed, None, self.out_features)


def run_amx_linear_bench(model: str = "smollm2-135m", rounds: int = 3, seed: int = 0) -> dict:
    if not amx_linear.available():
        raise RuntimeError("the AMX tile linear does not run here (no AMX-BF16, or turned off)")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = ModelConfig.from_folder(resolve_model(model))
    weights = [((torch.randn(n, k) * 0.02).bfloat16(), k) for n, k in linear_shapes(config)]
    chains = {"onednn": [(OneDNNPacked(w, None), k) for w, k in weights],
              "tiles": [(TileChainLink(w), k) for w, k in weights]}
    del weights
    cases = {f"linears_{rows}_rows": Case("s", KINDS, "tiles_speedup") for rows in CHAIN_ROWS}
    engine_args = dict(dtype="bf16", max_num_seqs=16, max_num_batched_tokens=4096, num_speculative_tokens=0, seed=seed)
    with amx_linear.turned_off():
        onednn_llm = LLM(model, **engine_args)
    engines = {"onednn": onednn_llm, "tiles": LLM(model, **engine_args)}
    for name in (f"prefill_{PREFILL_PROMPTS}x{PREFILL_TOKENS}", *(f"decode_b{b}" for b in DECODE_BATCHES)):
        cases[name] = Case("tokens/s", KINDS, "tiles_speedup")
    interleaved_rounds(chains, engines, cases, CHAIN_ROWS, rounds, rng, config, torch.bfloat16, "tiles_speedup")
    return {"model": model, "dtype": "bf16", "rounds": rounds, "threads": torch.get_num_threads(),
            "small_rows": amx_linear.SMALL_ROWS, "measured_on": provenance(),
            "cases": {name: case.summary() for name, case in cases.items()}}


CASE_LABELS = case_labels(CHAIN_ROWS, ", no speculation")


def markdown_table(result: dict) -> str:
    """The README's table of a `run_amx_linear_bench` result."""
    return int8_table(result, CASE_LABELS, KINDS, "tiles_speedup")
