"""The engine on CUDA: the claims of the CPU tests, made again on a GPU.

Skipped where there is no CUDA device; `scripts/device_check.sh` runs this file (and the engine
and memory tests, which pick the GPU by themselves) on one. On CUDA:
- our bf16 logits are within bf16 rounding of transformers' on the same GPU (that test lives in
  test_model_matches_transformers.py, for every device here);
- greedy text equals transformers' for 32 tokens on three prompts (fp32, as on the CPU);
- a batch gives each sequence the tokens it gets alone;
- KV moves cross page-locked host memory on a side stream, and pages survive the round trip.
"""

import random

import pytest
import torch

from scalesim import LLM, SamplingParams
from scalesim.bench.accuracy_bench import PROMPTS
from scalesim.memory.copy_stream import CopyStreams, host_copy
from scalesim.models.registry import resolve_model, smollm2_gguf_path
from tests.conftest import random_prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: scripts/device_check.sh runs these on one")
MODELS = ["tiny-random", pytest.param("smollm2-135m", marks=pytest.mark.slow)]


def _model_or_skip(name: str) -> str:
    if name == "smollm2-135m":
        try:
            smollm2_gguf_path()
        except Exception as exc:
            pytest.skip(f"smollm2-135m is not here: {exc}")
    return name


def _hf(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(resolve_model(name)), dtype=dtype).to("cuda").eval()


@pytest.mark.parametrize("name", MODELS)
def test_greedy_32_tokens_equal_transformers_on_three_prompts(name):
    name = _model_or_skip(name)
    ours = LLM(name, device="cuda", dtype="fp32", kv_cache_memory="256MiB")
    hf = _hf(name, torch.float32)
    outputs = ours.generate(list(PROMPTS), SamplingParams(max_tokens=32, temperature=0))
    for prompt, output in zip(PROMPTS, outputs):
        ids = ours.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=32, do_sample=False)[0, len(ids):]
        assert output.outputs[0].token_ids == ref.tolist(), prompt


def test_a_batch_gives_each_sequence_the_tokens_it_gets_alone():
    """Prompts of unlike lengths (one page to many), so that the batch pads and the page tables differ."""
    rng = random.Random(0)
    prompts = [random_prompt(rng, n) for n in (5, 40, 130, 300)]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    batched, single = (LLM("tiny-random", device="cuda", dtype="fp32", kv_cache_memory="64MiB", block_size_tokens=16)
                       for _ in range(2))
    together = [o.outputs[0].token_ids for o in batched.generate(prompts, greedy)]
    alone = [single.generate([p], greedy)[0].outputs[0].token_ids for p in prompts]
    assert together == alone


def test_compiled_flex_attention_gives_the_tokens_of_the_gather_path():
    """The compiled kernel visits only the pages the block mask lists (the eager reference the CPU
    tests use scores every slot), so the sparsity is tested here, on 16-token pages."""
    rng = random.Random(1)
    shared = random_prompt(rng, 70)
    prompts = [random_prompt(rng, n) for n in (5, 40, 300)] + [shared + random_prompt(rng, n) for n in (9, 33)]
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    tokens = {}
    for attention in ("gather", "flex"):
        llm = LLM("tiny-random", device="cuda", dtype="fp32", kv_cache_memory="64MiB", block_size_tokens=16,
                  max_num_batched_tokens=128, attention=attention)
        llm.generate([shared], greedy)
        tokens[attention] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    assert tokens["flex"] == tokens["gather"]


def test_moves_copy_on_a_side_stream_into_page_locked_memory():
    copies = CopyStreams("cuda")
    a = torch.randn(2048, 2048, device="cuda")
    source = a
    for _ in range(50):  # still computing on the default stream when the move starts
        source = torch.tanh(source @ a)
    with copies.moving():
        assert torch.cuda.current_stream() != torch.cuda.default_stream(), "copies run beside compute"
        host = host_copy(source)
        back = host.to("cuda", non_blocking=True)
    assert host.is_pinned()
    assert torch.equal(back, source), "a move's copies wait for queued compute and are complete when the block exits"


def test_kv_pages_evicted_to_pinned_host_memory_come_back_intact():
    """Under a device that holds about two agents, every agent's pages go to the host and back
    through the side streams; greedy tokens equal a run where nothing moves."""
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = {f"agent-{i}": random_prompt(random.Random(i), 60) for i in range(6)}
    tight = LLM("tiny-random", device="cuda", dtype="fp32", device_memory="96KiB", host_memory="64MiB",
                block_size_tokens=4, max_num_batched_tokens=256)
    roomy = LLM("tiny-random", device="cuda", dtype="fp32", device_memory="64MiB", block_size_tokens=4,
                max_num_batched_tokens=256)
    for llm in (tight, roomy):
        for agent, prompt in prompts.items():
            llm.generate([prompt], greedy, agent_ids=[agent])
    outputs = {}
    for llm in (tight, roomy):
        outputs[llm is tight] = [llm.generate([p + [7, 8]], greedy, agent_ids=[a])[0].outputs[0].token_ids
                                 for a, p in prompts.items()]
    stats = tight.memory_stats()
    assert stats.get("bytes_in.kv.host_to_device", 0) > 0, "pages came back from the host"
    assert outputs[True] == outputs[False]
    host_pages = [o.host_kv for o in tight.engine.memory.objects.values() if getattr(o, "host_kv", None) is not None]
    assert host_pages and all(kv.is_pinned() for kv in host_pages)
