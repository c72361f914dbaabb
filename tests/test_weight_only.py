"""Weight-only linears (`--quantization fp16` and `int8`): the kernel computes exactly the float32
product with the stored weight, widened back to float32, whatever the batch, and such an engine is
an fp32 engine over those weights, adapters included."""

import pytest
import torch
from torch import nn

from scalesim import LLM, SamplingParams
from scalesim.config import EngineConfig
from scalesim.config import WEIGHT_ONLY
from scalesim.layers import weight_only
from scalesim.layers.weight_only import PackedWeight, compress_weights, half_rows, quantize_rows
from scalesim.layers.linear import Linear
from scalesim.models.loader import load_model
from scalesim.models.registry import resolve_model
from scalesim.weights.fixtures import make_random_adapters

pytestmark = pytest.mark.skipif(not weight_only.available(),
                                reason="the weight-only kernel needs an x86 CPU with AVX2, FMA and F16C")


def test_rounding_is_within_half_a_step_per_channel():
    weight = torch.randn(37, 50) * torch.logspace(-3, 1, 37)[:, None]
    weight[5] = 0.0
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert (q.float() * scale[:, None] - weight).abs().le(scale[:, None] / 2 + 1e-7).all()
    assert scale[5] == 1.0 and (q[5] == 0).all()


def test_fp16_rounds_to_nearest_without_a_scale():
    weight = torch.randn(7, 9) * 0.02
    stored, scale = half_rows(weight)
    assert stored.dtype == torch.float16 and scale is None and torch.equal(stored, weight.half())
    weight[3, 4] = 70000.0  # past float16's largest, 65504: it would become infinite
    with pytest.raises(ValueError, match="range"):
        half_rows(weight)


@pytest.mark.parametrize("fmt", WEIGHT_ONLY)
@pytest.mark.parametrize("out_features", [1, 15, 16, 33, 960])
@pytest.mark.parametrize("in_features", [3, 17, 300, 576])
def test_kernel_equals_float32_matmul_over_the_dequantized_weight(fmt, out_features, in_features):
    torch.manual_seed(out_features * 1000 + in_features)
    weight, bias = torch.randn(out_features, in_features), torch.randn(out_features)
    layer = PackedWeight(weight, bias, fmt)
    reference = layer.dequantized()
    for rows in (1, 2, 5, 6, 7, 13, 64):
        x = torch.randn(rows, in_features)
        expected = x.double() @ reference.double().T + bias.double()
        got = layer(x)
        assert got.shape == (rows, out_features) and got.dtype == torch.float32
        tolerance = 1e-5 * (x.abs().double() @ reference.abs().double().T + bias.abs().double()).max()
        assert (got.double() - expected).abs().max() <= tolerance


@pytest.mark.parametrize("fmt", WEIGHT_ONLY)
def test_each_row_is_the_same_in_any_batch(fmt):
    """Rows never mix: a row computed alone equals it computed among others, bit for bit (the
    kernel takes rows in chunks of 512, those in blocks of 6 and the remainder separately)."""
    layer = PackedWeight(torch.randn(48, 300), None, fmt)
    x = torch.randn(1030, 300)
    together = layer(x)
    assert (together - x @ layer.dequantized().T).abs().max() <= 1e-4
    for i in [*range(13), 511, 512, 1023, 1024, 1029]:
        assert torch.equal(layer(x[i:i + 1]), together[i:i + 1])
    assert torch.equal(layer(x[:13]), together[:13])


@pytest.mark.parametrize("fmt", WEIGHT_ONLY)
def test_many_panels_are_bit_for_bit_per_row(fmt):
    """320 outputs are 20 panels (split between threads where there are several): a row's result
    still does not depend on the rows beside it."""
    layer = PackedWeight(torch.randn(320, 200), None, fmt)
    x = torch.randn(9, 200)
    together = layer(x)
    assert (together - x @ layer.dequantized().T).abs().max() <= 1e-4
    assert all(torch.equal(layer(x[i:i + 1]), together[i:i + 1]) for i in range(9))


@pytest.mark.parametrize("fmt", WEIGHT_ONLY)
def test_strided_batched_and_empty_inputs(fmt):
    layer = PackedWeight(torch.randn(20, 8), None, fmt)
    wide = torch.randn(4, 3, 16)
    x = wide[..., ::2]  # a view whose last dimension is not contiguous
    assert torch.allclose(layer(x), x @ layer.dequantized().T, atol=1e-5)
    rows = torch.randn(7, 20)[:, 3:11]  # rows 20 apart: the kernel reads them in place
    assert rows.stride() == (20, 1)
    assert torch.allclose(layer(rows), rows @ layer.dequantized().T, atol=1e-5)
    assert layer(torch.randn(0, 8)).shape == (0, 20)
    one = PackedWeight(torch.randn(5, 1), None, fmt)
    column = torch.randn(1, 3).t()  # 3 rows of one feature, whose stride is 3 (PyTorch calls it contiguous)
    assert column.stride(1) != 1 and column.is_contiguous()
    assert torch.allclose(one(column), column @ one.dequantized().T, atol=1e-6)
    with pytest.raises(RuntimeError, match="float32"):
        layer(torch.randn(2, 8, dtype=torch.bfloat16))


def test_the_kernel_checks_its_arguments():
    op = torch.ops.scalesim.weight_only_linear
    layer, half = PackedWeight(torch.randn(20, 8), None, "int8"), PackedWeight(torch.randn(20, 8), None, "fp16")
    with pytest.raises(RuntimeError, match="features"):
        op(torch.randn(2, 9), layer.packed, layer.scale, 20)
    with pytest.raises(RuntimeError, match="panels"):
        op(torch.randn(2, 8), layer.packed, layer.scale, 40)
    with pytest.raises(RuntimeError, match="scale"):
        op(torch.randn(2, 8), layer.packed, None, 20)
    with pytest.raises(RuntimeError, match="scale"):
        op(torch.randn(2, 8), half.packed, layer.scale, 20)
    with pytest.raises(RuntimeError, match="int8 or float16"):
        op(torch.randn(2, 8), half.packed.float(), None, 20)


def _dequantized_reference(base: str, fmt: str, **engine_args) -> LLM:
    """An fp32 engine whose every linear computes with the `fmt` engine's dequantized weight."""
    reference = LLM(base, dtype="fp32", **engine_args)
    original = load_model(resolve_model(base), torch.float32, "cpu")
    for name, module in original.named_modules():
        if isinstance(module, Linear):
            target = reference.engine.model.get_submodule(name)
            target.kernel = None
            target.weight = nn.Parameter(PackedWeight(module.weight, module.bias, fmt).dequantized(), requires_grad=False)
    return reference


# how far each format moves tiny-random's logits from float32's, at least
CHANGES_LOGITS_BY = {"fp16": 1e-6, "int8": 1e-3}


@pytest.mark.parametrize("fmt", WEIGHT_ONLY)
@pytest.mark.parametrize("base", ["tiny-random", "tiny-random-qwen2"])
def test_a_weight_only_engine_is_an_fp32_engine_over_dequantized_weights(fmt, base, tmp_path):
    """Prompt logits and greedy text, with and without a LoRA adapter (whose delta stays float32):
    every projection (fused q/k/v with Qwen2's bias, o, gate/up, down, the tied head) goes
    through the kernel."""
    make_random_adapters(base, tmp_path, count=1, rank=8, seed=3)
    engine_args = dict(kv_cache_memory="4MiB", block_size_tokens=4)
    ours = LLM(base, quantization=fmt, **engine_args)
    reference = _dequantized_reference(base, fmt, **engine_args)
    for llm in (ours, reference):
        llm.add_adapter("a", str(tmp_path / "adapter-0"))
    plain = LLM(base, dtype="fp32", **engine_args)
    ids = ours.tokenizer.encode("Alice meets Bob at the cafe and they talk about the village news")
    logits = {}
    for adapter in (None, "a"):  # each engine's first look at the prompt: every position computed
        got, want = ours.prompt_logits(ids, adapter=adapter), reference.prompt_logits(ids, adapter=adapter)
        assert got.shape == want.shape == (len(ids), ours.engine.model_config.vocab_size)
        assert (got - want).abs().max().item() <= 1e-4
        logits[adapter] = got
    unquantized = plain.prompt_logits(ids)
    assert unquantized.shape == logits[None].shape
    assert (logits[None] - unquantized).abs().max().item() > CHANGES_LOGITS_BY[fmt], f"{fmt} must change the weights"
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [ids, ids[:5], ids[3:9]]
    assert [o.outputs[0].token_ids for o in ours.generate(prompts, params, adapters=["a", None, "a"])] == \
        [o.outputs[0].token_ids for o in reference.generate(prompts, params, adapters=["a", None, "a"])]


@pytest.mark.parametrize("fmt", WEIGHT_ONLY)
def test_weight_only_frees_the_float32_weights_and_keeps_the_embedding(fmt):
    llm = LLM("tiny-random", quantization=fmt, kv_cache_memory="4MiB")
    model = llm.engine.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(isinstance(m.kernel, PackedWeight) for m in linears)
    tied = model.lm_head.weight is model.embed_tokens.weight
    assert all(m.weight.numel() == 0 for m in linears if not (tied and m is model.lm_head))
    assert model.embed_tokens.weight.numel() > 0 and model.embed_tokens.weight.dtype == torch.float32


@pytest.mark.parametrize("fmt", WEIGHT_ONLY)
def test_kv_saved_under_other_weights_is_not_restored(fmt, tmp_path):
    """KV that fp32 weights computed, found again by an fp32 engine on the same state directory,
    is not served to an fp16 or int8 engine there (its values are not what those weights compute)."""
    prompts = [[(7 * i + j) % 400 + 10 for j in range(40)] for i in range(4)]
    params = SamplingParams(max_tokens=2, temperature=0)
    settings = dict(kv_cache_memory="4MiB", block_size_tokens=4, disk_dir=str(tmp_path / "state"))
    first = LLM("tiny-random", dtype="fp32", **settings)
    first.generate(prompts, params)
    first.engine.shutdown()
    again = LLM("tiny-random", dtype="fp32", **settings)
    assert again.engine.memory.store.entries("kv") != []
    assert again.generate([prompts[0]], params)[0].num_cached_tokens > 0
    again.engine.shutdown()
    quantized = LLM("tiny-random", quantization=fmt, **settings)
    assert quantized.engine.memory.store.entries("kv") == []
    assert quantized.generate([prompts[0]], params)[0].num_cached_tokens == 0
    quantized.engine.shutdown()


@pytest.mark.parametrize("fmt", WEIGHT_ONLY)
def test_settings_weight_only_cannot_run_are_refused(fmt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # `auto` means the CPU under fp16/int8 beside a GPU
    config = EngineConfig(model="tiny-random", quantization=fmt)
    assert (config.dtype, config.device) == ("fp32", "cpu")
    assert EngineConfig(model="tiny-random", dtype="fp32").device == "cuda"  # (the fake holds for this)
    with pytest.raises(ValueError, match="float32"):
        EngineConfig(model="tiny-random", quantization=fmt, dtype="bf16")
    with pytest.raises(ValueError, match="CPU"):
        EngineConfig(model="tiny-random", quantization=fmt, device="cuda")
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(model="tiny-random", quantization="int4")


@pytest.mark.parametrize("fmt", WEIGHT_ONLY)
def test_without_the_kernel_weight_only_is_refused_and_the_model_untouched(fmt, monkeypatch):
    monkeypatch.setattr(weight_only, "available", lambda: False)
    model = load_model(resolve_model("tiny-random"), torch.float32, "cpu")
    with pytest.raises(ValueError, match="AVX2"):
        compress_weights(model, fmt)
    assert all(m.kernel is None and m.weight.numel() > 0 for m in model.modules() if isinstance(m, Linear))


def test_auto_picks_fp16_weights_only_where_fp32_was_left_to_choose(monkeypatch):
    """The product default: fp16 weights where the engine was left to choose its dtype and chose
    float32 on a CPU; a named dtype, bf16, a GPU or a missing kernel keep the dtype's weights."""
    from scalesim import config as config_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU host, wherever this runs
    monkeypatch.setattr(config_module, "auto_dtype", lambda device: "fp32")
    assert EngineConfig(model="tiny-random").quantization == "fp16"
    assert EngineConfig(model="tiny-random", dtype="float32").quantization == "none"  # named, by any spelling
    assert (EngineConfig(model="tiny-random", dtype="auto", device="cpu").quantization,
            EngineConfig(model="tiny-random").dtype) == ("fp16", "fp32")
    assert EngineConfig(model="tiny-random", dtype="fp32").quantization == "none"
    assert EngineConfig(model="tiny-random", quantization="none").quantization == "none"
    assert EngineConfig(model="tiny-random", quantization="int8").quantization == "int8"
    monkeypatch.setattr(weight_only, "available", lambda: False)
    assert EngineConfig(model="tiny-random").quantization == "none"
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(config_module, "auto_dtype", lambda device: "bf16")
    assert EngineConfig(model="tiny-random").quantization == "none"
    monkeypatch.setattr(config_module, "auto_dtype", lambda device: "fp32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = EngineConfig(model="tiny-random")
    assert (gpu.device, gpu.quantization) == ("cuda", "none")


def test_the_default_engine_runs_fp16_weights_where_auto_picks_them():
    llm = LLM("tiny-random", kv_cache_memory="4MiB")
    if llm.engine.config.quantization != "fp16":
        pytest.skip(f"auto picks {llm.engine.config.quantization} weights here")
    linears = [m for m in llm.engine.model.modules() if isinstance(m, Linear)]
    assert all(isinstance(m.kernel, PackedWeight) and m.kernel.packed.dtype == torch.float16 for m in linears)
