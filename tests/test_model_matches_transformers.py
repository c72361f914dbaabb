"""Our forward over the paged cache gives Hugging Face transformers' logits on the same weights."""

import pytest
import torch

from scalesim import LLM
from scalesim.bench.accuracy_bench import PROMPTS
from scalesim.models.registry import resolve_model, smollm2_gguf_path

TOLERANCE = 1e-4
PROMPT = "Alice meets Bob at the cafe in the morning and they talk about plans for the day"
CONTINUATION = " then they walk to the park and read the news"


@pytest.fixture(scope="module", params=["tiny-random", "tiny-random-qwen2"])
def pair(request):
    from transformers import AutoModelForCausalLM

    llm = LLM(request.param, dtype="fp32", kv_cache_memory="8MiB", block_size_tokens=4)
    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model(request.param)), dtype=torch.float32).eval()
    return llm, hf


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def test_fresh_prompt_logits_match_transformers(pair):
    llm, hf = pair
    ids = llm.tokenizer.encode(PROMPT + " (fresh)")
    ours = llm.prompt_logits(ids)
    assert ours.shape[0] == len(ids)
    assert (ours - _hf_logits(hf, ids)).abs().max().item() <= TOLERANCE


def test_logits_on_a_cached_prefix_match_transformers(pair):
    llm, hf = pair
    prefix = llm.tokenizer.encode(PROMPT)
    llm.prompt_logits(prefix)
    ids = prefix + llm.tokenizer.encode(CONTINUATION)
    ours = llm.prompt_logits(ids)
    computed = ours.shape[0]
    assert computed < len(ids) - 8, "the second prompt should have reused the cached prefix"
    assert (ours - _hf_logits(hf, ids)[-computed:]).abs().max().item() <= TOLERANCE


def test_greedy_generation_matches_transformers(pair):
    llm, hf = pair
    from scalesim import SamplingParams

    ids = llm.tokenizer.encode("Eve will write a post")
    ours = llm.generate([ids], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, len(ids):]
    assert ours == ref.tolist()


def test_matmul_params_count_every_weight_matrix_a_token_goes_through(pair):
    """What the projection charges per token (ModelConfig.matmul_params) is every weight matrix of
    the Hugging Face model's layers plus its LM head (not the embedding lookup)."""
    llm, hf = pair
    layers = sum(p.numel() for name, p in hf.named_parameters() if p.dim() == 2 and ".layers." in name)
    assert llm.engine.model_config.matmul_params == layers + hf.get_output_embeddings().weight.numel()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
BF16_MARGIN = 1.25  # our bf16 error may exceed transformers' by a quarter: other kernels, other rounding


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["tiny-random", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_bf16_logits_are_as_close_to_fp32_as_transformers_bf16_is(name, device):
    """Within bf16 rounding of transformers: our bf16 logits are no farther from an fp32 reference
    than transformers' own bf16 logits are, on the same device. (On SmolLM2 the RoPE tables
    rounded through bf16 made ours 0.87 from fp32 against transformers' 0.55.)"""
    from transformers import AutoModelForCausalLM
    if name == "smollm2-135m":
        smollm2_gguf_path()  # the package is installed with the project; a clear error if not
    ours = LLM(name, device=device, dtype="bf16", kv_cache_memory="64MiB")
    ids = ours.tokenizer.encode(PROMPTS[0])
    hf = {dtype: AutoModelForCausalLM.from_pretrained(str(resolve_model(name)), dtype=dtype).to(device).eval()
          for dtype in (torch.float32, torch.bfloat16)}
    with torch.no_grad():
        reference, theirs = (hf[dtype](torch.tensor([ids], device=device)).logits[0].float()
                             for dtype in (torch.float32, torch.bfloat16))
    ours_error = (ours.prompt_logits(ids).to(device).float() - reference).abs().max().item()
    theirs_error = (theirs - reference).abs().max().item()
    assert ours_error <= BF16_MARGIN * theirs_error + 1e-3, (ours_error, theirs_error)
