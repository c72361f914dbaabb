"""Our forward over the paged cache gives Hugging Face transformers' logits on the same weights."""

import pytest
import torch

from scalesim import LLM
from scalesim.models.registry import resolve_model

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
