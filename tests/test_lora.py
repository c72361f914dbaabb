"""Per-agent LoRA adapters and private models, mixed in one batch, isolated in the KV cache."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from scalesim import LLM, SamplingParams
from scalesim.errors import InvalidRequestError
from scalesim.models.registry import resolve_model
from scalesim.weights.fixtures import make_private_model, make_random_adapters

TOLERANCE = 1e-4
PROMPT = "Alice meets Bob at the cafe and they talk about the village news"


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    make_random_adapters("tiny-random", root / "llama", count=4, rank=8, seed=10)
    make_random_adapters("tiny-random", root / "llama-rs", count=1, rank=4, use_rslora=True,
                         targets=("q_proj", "v_proj"), seed=20)
    make_random_adapters("tiny-random-qwen2", root / "qwen2", count=1, rank=8, seed=30)
    make_private_model("tiny-random", root / "private-0", seed=1)
    make_private_model("tiny-random", root / "private-1", seed=2)
    return root


def _engine_logits(llm: LLM, requests: list[dict]) -> list[torch.Tensor]:
    """Prompt logits of several requests run together in one batch."""
    engine = llm.engine
    ids = [engine.add_request(r["prompt"], SamplingParams(max_tokens=1, temperature=0), adapter=r.get("adapter"),
                              model=r.get("model"), want_prompt_logits=True) for r in requests]
    seqs = [engine.requests[i].seqs[0] for i in ids]
    while engine.has_unfinished():
        engine.step()
    return [torch.cat(s.prompt_logits) for s in seqs]


@pytest.mark.parametrize("base, folder", [("tiny-random", "llama/adapter-0"), ("tiny-random", "llama-rs/adapter-0"),
                                          ("tiny-random-qwen2", "qwen2/adapter-0")])
def test_adapter_logits_match_peft_reference(weights_dir, base, folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    llm = LLM(base, dtype="fp32", kv_cache_memory="4MiB", block_size_tokens=4)
    llm.add_adapter("a", str(weights_dir / folder))
    ids = llm.tokenizer.encode(PROMPT)
    ours = llm.prompt_logits(ids, adapter="a")
    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model(base)), dtype=torch.float32)
    reference = PeftModel.from_pretrained(hf, str(weights_dir / folder)).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    base_logits = llm.prompt_logits(ids + [7])[: len(ids)]
    assert (base_logits - expected).abs().max() > 10 * TOLERANCE, "the adapter must change the logits"
    assert (ours - expected).abs().max().item() <= TOLERANCE


@pytest.fixture(scope="module")
def mixed_llm(weights_dir):
    llm = LLM("tiny-random", kv_cache_memory="8MiB", block_size_tokens=4)
    for i in range(4):
        llm.add_adapter(f"lora-{i}", str(weights_dir / "llama" / f"adapter-{i}"))
    llm.add_private_model("private-0", str(weights_dir / "private-0"))
    llm.add_private_model("private-1", str(weights_dir / "private-1"))
    return llm


MIXED = ([{"adapter": f"lora-{i}"} for i in range(4)] + [{}] +
         [{"model": "private-0"}, {"model": "private-1"}])


def test_a_batch_mixing_adapters_base_and_private_models_equals_each_alone(mixed_llm):
    requests = [dict(r, prompt=f"{PROMPT} number {i}") for i, r in enumerate(MIXED)]
    together = _engine_logits(mixed_llm, requests)
    for request, logits in zip(requests, together):
        mixed_llm.engine.reset_prefix_cache()
        alone = _engine_logits(mixed_llm, [request])[0]
        assert alone.shape == logits.shape
        assert (alone - logits).abs().max().item() <= TOLERANCE, request


def test_batched_generation_with_mixed_weights_equals_each_alone(mixed_llm):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [f"the agent {i} will" for i in range(len(MIXED))]
    adapters = [r.get("adapter") for r in MIXED]
    models = [r.get("model") for r in MIXED]
    together = mixed_llm.generate(prompts, params, adapters=adapters, models=models)
    for i, out in enumerate(together):
        alone = mixed_llm.generate([prompts[i]], params, adapters=[adapters[i]], models=[models[i]])[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
    assert len({tuple(o.outputs[0].token_ids) for o in together}) > 3, "weights should change the outputs"


def test_kv_written_under_one_adapter_is_never_reused_under_another(mixed_llm):
    ids = mixed_llm.tokenizer.encode(PROMPT + " isolation check")
    params = SamplingParams(max_tokens=1, temperature=0)
    mixed_llm.generate([ids], params, adapters=["lora-0"])
    for other in ({"adapters": ["lora-1"]}, {"adapters": [None]}, {"models": ["private-0"]}):
        assert mixed_llm.generate([ids], params, **other)[0].num_cached_tokens == 0, other
        assert mixed_llm.generate([ids], params, **other)[0].num_cached_tokens > 0, "same weights share"
    again = mixed_llm.generate([ids], params, adapters=["lora-0"], agent_ids=["another-agent"])[0]
    assert again.num_cached_tokens > 0


def test_model_alias_base_colon_adapter_selects_the_adapter(mixed_llm):
    ids = mixed_llm.tokenizer.encode(PROMPT)
    by_alias = mixed_llm.prompt_logits(ids, model="tiny-random:lora-2")
    mixed_llm.engine.reset_prefix_cache()
    by_name = mixed_llm.prompt_logits(ids, adapter="lora-2")
    assert torch.equal(by_alias, by_name)


def test_an_adapter_moved_to_disk_is_reloaded_before_it_runs(mixed_llm):
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = mixed_llm.generate(["hello world"], params, adapters=["lora-3"])[0].outputs[0].token_ids
    adapter = mixed_llm.engine.weights.adapters["lora-3"]
    adapter.move_to("disk")
    assert adapter.weights == {}
    mixed_llm.engine.reset_prefix_cache()
    assert mixed_llm.generate(["hello world"], params, adapters=["lora-3"])[0].outputs[0].token_ids == expected
    assert adapter.tier == "device"


def test_the_runner_refuses_weights_that_are_not_on_the_device(mixed_llm):
    from scalesim.engine.scheduler import ScheduledSequence
    engine = mixed_llm.engine
    request_id = engine.add_request([10, 11, 12], SamplingParams(max_tokens=2), adapter="lora-1")
    seq = engine.requests[request_id].seqs[0]
    engine.weights.adapters["lora-1"].move_to("host")
    with pytest.raises(RuntimeError, match="not on the device"):
        engine.runner.run([ScheduledSequence(seq, 3)])
    while engine.has_unfinished():
        engine.step()
    assert seq.finish_reason == "length"


def test_a_pinned_adapter_cannot_be_removed(mixed_llm):
    engine = mixed_llm.engine
    engine.add_request(list(range(10, 30)), SamplingParams(max_tokens=20, ignore_eos=True), adapter="lora-0")
    engine.step()
    with pytest.raises(InvalidRequestError, match="in use"):
        engine.weights.remove("lora-0")
    while engine.has_unfinished():
        engine.step()
    assert engine.weights.adapters["lora-0"].pin_count == 0


# --- bad input ---------------------------------------------------------------------------------

@pytest.fixture
def llm():
    return LLM("tiny-random", kv_cache_memory="2MiB", block_size_tokens=4, max_lora_rank=8)


def _edited_adapter(weights_dir, tmp_path, edit_config=None, edit_tensors=None):
    folder = tmp_path / "edited"
    shutil.copytree(weights_dir / "llama" / "adapter-0", folder)
    if edit_config:
        config = json.loads((folder / "adapter_config.json").read_text())
        edit_config(config)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_adapter_rank_above_max_lora_rank(llm, weights_dir, tmp_path):
    folder = _edited_adapter(weights_dir, tmp_path, edit_config=lambda c: c.update(r=16))
    with pytest.raises(InvalidRequestError, match="rank 16 is outside 1..8"):
        llm.add_adapter("big", str(folder))


def test_adapter_targeting_a_module_the_base_does_not_have(llm, weights_dir, tmp_path):
    folder = _edited_adapter(weights_dir, tmp_path, edit_config=lambda c: c.update(target_modules=["q_proj", "c_attn"]))
    with pytest.raises(InvalidRequestError, match="c_attn"):
        llm.add_adapter("odd", str(folder))


def test_adapter_tensor_of_the_wrong_shape(llm, weights_dir, tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    folder = _edited_adapter(weights_dir, tmp_path, edit_tensors=lambda t: t.update({key: t[key][:, :10].contiguous()}))
    with pytest.raises(InvalidRequestError, match="layer 0 q_proj has A"):
        llm.add_adapter("bad", str(folder))


def test_adapter_tensor_for_a_layer_the_base_does_not_have(llm, weights_dir, tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    folder = _edited_adapter(weights_dir, tmp_path, edit_tensors=lambda t: t.update(
        {key.replace("layers.0", "layers.9"): t[key].clone()}))
    with pytest.raises(InvalidRequestError, match="does not have"):
        llm.add_adapter("bad", str(folder))


def test_adapter_with_missing_files(llm, weights_dir, tmp_path):
    with pytest.raises(InvalidRequestError, match="not a folder"):
        llm.add_adapter("missing", str(tmp_path / "nowhere"))
    folder = _edited_adapter(weights_dir, tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidRequestError, match="no adapter_model.safetensors"):
        llm.add_adapter("no-weights", str(folder))


def test_private_model_of_another_architecture(llm):
    with pytest.raises(InvalidRequestError, match="another architecture"):
        llm.add_private_model("qwen", str(resolve_model("tiny-random-qwen2")))


def test_unknown_adapter_or_model_in_a_request(llm):
    with pytest.raises(InvalidRequestError, match="unknown adapter 'nope'"):
        llm.generate(["hi"], SamplingParams(max_tokens=2), adapters=["nope"])
    with pytest.raises(InvalidRequestError, match="unknown model 'other'"):
        llm.generate(["hi"], SamplingParams(max_tokens=2), models=["other"])
    with pytest.raises(InvalidRequestError, match="unknown adapter"):
        llm.generate(["hi"], SamplingParams(max_tokens=2), models=["tiny-random:nope"])
    assert llm.generate(["hi"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_a_name_cannot_be_registered_twice(llm, weights_dir):
    llm.add_adapter("a", str(weights_dir / "llama" / "adapter-0"))
    with pytest.raises(InvalidRequestError, match="already registered"):
        llm.add_adapter("a", str(weights_dir / "llama" / "adapter-1"))
