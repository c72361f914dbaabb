"""`scalesim microbench accuracy`: what a lower-precision dtype, or int8 weights
(`--quantization int8`), costs in output, against fp32.

For each prompt (the three the built-in model's tests use), both engines generate `gen_len`
greedy tokens; the report gives the first position where the texts part (None when they never
do), and, over every prompt position, the largest absolute logit error, the largest error
relative to the fp32 logits' spread, and how often the top token agrees.
"""

from dataclasses import dataclass, field

from scalesim.bench.provenance import provenance
from scalesim.llm import LLM
from scalesim.sampling_params import SamplingParams

PROMPTS = ("The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):")


@dataclass
class PromptAccuracy:
    prompt: str
    reference_text: str
    text: str
    first_divergence: int | None   # index of the first generated token that differs
    max_abs_logit_error: float
    max_relative_logit_error: float  # error / (max - min) of the fp32 logits at that position
    top1_agreement: float           # share of prompt positions whose argmax token agrees


@dataclass
class AccuracyBenchResult:
    model: str
    dtype: str
    reference_dtype: str
    gen_len: int
    prompts: list[PromptAccuracy]
    greedy_equal: int              # prompts whose whole greedy text is equal
    quantization: str = "none"
    measured_on: dict = field(default_factory=provenance)


def _greedy(llm: LLM, prompts: tuple[str, ...], gen_len: int) -> list[list[int]]:
    outputs = llm.generate(list(prompts), SamplingParams(max_tokens=gen_len, temperature=0))
    return [o.outputs[0].token_ids for o in outputs]


def run_accuracy_bench(model: str, dtype: str, gen_len: int = 32, reference_dtype: str = "fp32",
                       prompts: tuple[str, ...] = PROMPTS, quantization: str = "none") -> AccuracyBenchResult:
    reference, candidate = LLM(model, dtype=reference_dtype), LLM(model, dtype=dtype, quantization=quantization)
    expected, got = _greedy(reference, prompts, gen_len), _greedy(candidate, prompts, gen_len)
    rows = []
    for prompt, want, have in zip(prompts, expected, got):
        ids = reference.tokenizer.encode(prompt)
        ref_logits = reference.prompt_logits(ids).float()
        logits = candidate.prompt_logits(ids).float()
        # every position computed (a prompt longer than a page would be cached by the greedy run)
        assert ref_logits.shape == logits.shape == (len(ids), ref_logits.shape[-1]), "prompt logits were cached"
        error = (logits - ref_logits).abs()
        spread = (ref_logits.max(-1).values - ref_logits.min(-1).values).unsqueeze(-1)
        parted = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), None)
        rows.append(PromptAccuracy(
            prompt=prompt, reference_text=reference.tokenizer.decode(want), text=candidate.tokenizer.decode(have),
            first_divergence=parted, max_abs_logit_error=round(error.max().item(), 5),
            max_relative_logit_error=round((error / spread).max().item(), 6),
            top1_agreement=round((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(), 4)))
    return AccuracyBenchResult(model=model, dtype=candidate.engine.config.dtype, reference_dtype=reference_dtype,
                               gen_len=gen_len, prompts=rows,
                               greedy_equal=sum(r.first_divergence is None for r in rows),
                               quantization=candidate.engine.config.quantization)

