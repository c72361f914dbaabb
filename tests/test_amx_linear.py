"""The AMX tile linear (layers/amx_linear.py): its results against a float32 matmul, a row's
result independent of the rows batched with it, the hand-over to oneDNN above SMALL_ROWS, the
engine's choice of it, and clear errors for inputs it does not take. Skipped where the CPU has
no AMX-BF16 (the kernel refuses there; the engine keeps oneDNN)."""

import pytest
import torch

from scalesim.layers import amx_linear
from scalesim.layers.linear import Linear, OneDNNPacked, pack_for_cpu

pytestmark = pytest.mark.skipif(not amx_linear.available(), reason="no AMX-BF16 on this CPU")


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.float() @ w.float().T
    return out + bias.float() if bias is not None else out


@pytest.mark.parametrize("out_features, in_features", [(960, 576), (576, 1536), (49152, 576), (17, 64), (40, 96)])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 33, 80, 129, 300])
def test_the_tile_linear_equals_a_float32_matmul_rounded(out_features, in_features, rows):
    """Channel counts that are not a multiple of the 16-channel blocks (17, 40), rows around the
    tiles' 16 and the 256-row chunks, with and without a bias: within bfloat16's rounding of the
    output (sums run in float32)."""
    torch.manual_seed(rows * 7 + out_features)
    w = (torch.randn(out_features, in_features) * 0.05).bfloat16()
    bias = torch.randn(out_features).bfloat16()
    x = torch.randn(rows, in_features).bfloat16()
    packed = amx_linear.pack(w)
    for b in (None, bias):
        want = _reference(x, w, b)
        got = amx_linear.amx_linear(x, packed, b, out_features)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
        # one bfloat16 rounding of the result (8 bits) plus float32 sums in another order
        assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item()), b is None


def test_a_rows_result_does_not_depend_on_the_rows_batched_with_it():
    torch.manual_seed(1)
    w = (torch.randn(960, 576) * 0.05).bfloat16()
    packed = amx_linear.pack(w)
    x = torch.randn(80, 576).bfloat16()
    batched = amx_linear.amx_linear(x, packed, None, 960)
    for row in (0, 15, 16, 47, 79):
        assert torch.equal(amx_linear.amx_linear(x[row:row + 1], packed, None, 960), batched[row:row + 1])
    assert torch.equal(amx_linear.amx_linear(x[:33], packed, None, 960), batched[:33])


def test_leading_dimensions_are_kept_and_a_strided_input_is_read_right():
    torch.manual_seed(2)
    w = (torch.randn(64, 96) * 0.05).bfloat16()
    packed = amx_linear.pack(w)
    x = torch.randn(2, 5, 96).bfloat16()
    got = amx_linear.amx_linear(x, packed, None, 64)
    assert got.shape == (2, 5, 64)
    assert torch.equal(got.reshape(10, 64), amx_linear.amx_linear(x.reshape(10, 96), packed, None, 64))
    wide = torch.randn(7, 192).bfloat16()
    assert torch.equal(amx_linear.amx_linear(wide[:, :96], packed, None, 64),
                       amx_linear.amx_linear(wide[:, :96].contiguous(), packed, None, 64))
    assert amx_linear.amx_linear(torch.empty(0, 96, dtype=torch.bfloat16), packed, None, 64).shape == (0, 64)


def test_the_packed_weight_hands_large_batches_to_onednn():
    """Up to `small_rows` rows the tiles compute, above them oneDNN: both within rounding of the
    float32 result, and the tile path is what runs at or below the threshold (bit-equal to the
    kernel called directly)."""
    torch.manual_seed(3)
    w = (torch.randn(576, 576) * 0.05).bfloat16()
    packed = amx_linear.AmxPacked(w, None, small_rows=32)
    small, large = torch.randn(32, 576).bfloat16(), torch.randn(33, 576).bfloat16()
    assert torch.equal(packed(small), amx_linear.amx_linear(small, packed.tiles, None, 576))
    assert torch.equal(packed(large), OneDNNPacked(w, None)(large))
    for x in (small, large):
        want = _reference(x, w, None)
        assert torch.allclose(packed(x).float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    bias = torch.randn(576).bfloat16()  # q/k/v of Qwen2 have one; a 3-D input on both sides of the threshold
    with_bias = amx_linear.AmxPacked(w, bias, small_rows=32)
    for x in (small.view(4, 8, 576), large.view(3, 11, 576)):
        want = _reference(x, w, bias)
        got = with_bias(x)
        assert got.shape == (*x.shape[:-1], 576)
        assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_the_engine_packs_bfloat16_linears_for_the_tiles_and_float32_for_onednn():
    layers = torch.nn.ModuleList([Linear(576, 960), Linear(1536, 576), Linear(576, 576)])
    for layer in layers:
        layer.weight.data = (torch.randn(layer.out_features, layer.in_features) * 0.05).bfloat16()
    layers[2].weight.data = layers[2].weight.data.float()
    assert pack_for_cpu(layers) == 3
    assert [type(layer.kernel) for layer in layers] == [amx_linear.AmxPacked, amx_linear.AmxPacked, OneDNNPacked]
    assert layers[0].weight.numel() == 0  # the plain copy is freed


def test_inputs_the_kernel_does_not_take_are_refused_clearly():
    w = (torch.randn(64, 96) * 0.05).bfloat16()
    packed = amx_linear.pack(w)
    with pytest.raises(RuntimeError, match="bfloat16"):
        amx_linear.amx_linear(torch.randn(4, 96), packed, None, 64)
    with pytest.raises(RuntimeError, match="features"):
        amx_linear.amx_linear(torch.randn(4, 64).bfloat16(), packed, None, 64)
    with pytest.raises(RuntimeError, match="outputs"):
        amx_linear.amx_linear(torch.randn(4, 96).bfloat16(), packed, None, 100)
    with pytest.raises(RuntimeError, match="bias"):
        amx_linear.amx_linear(torch.randn(4, 96).bfloat16(), packed, torch.zeros(3).bfloat16(), 64)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        amx_linear.pack(torch.randn(64, 100).bfloat16())
    with pytest.raises(ValueError, match="K % 32"):
        amx_linear.AmxPacked(torch.randn(64, 96), None)
    assert not amx_linear.fits(torch.randn(64, 100).bfloat16())
