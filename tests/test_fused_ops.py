"""The fused elementwise kernels (kernels/fused_ops.cpp) against plain-PyTorch formulas: float32
equal up to the order of additions, bfloat16 within one rounding, on strided rows as the model
passes them, with a bad value kept to its own row."""

import pytest
import torch
import torch.nn.functional as F

from scalesim.layers import fused, kernel_build

pytestmark = pytest.mark.skipif(not kernel_build.load(fused.SOURCE), reason="fused kernels cannot be built here")
ops = torch.ops.scalesim
BF16_RTOL = 2 ** -7  # one bfloat16 rounding of either side


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=BF16_RTOL, atol=1e-3)


def _rows(rows: int, width: int, dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
    """[rows, width] whose rows are strided (a slice of a wider buffer), as split outputs are."""
    g = torch.Generator().manual_seed(rows * 7919 + width)
    return (torch.randn(rows, width + 5, generator=g) * scale).to(dtype)[:, 2:width + 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_silu_and_mul_is_silu_of_the_gate_times_the_up_half(dtype, rows):
    x = _rows(rows, 2 * 96, dtype, scale=8.0)
    gate, up = x.float().chunk(2, dim=-1)
    _close(ops.silu_and_mul(x), (F.silu(gate) * up).to(dtype))


def test_silu_and_mul_stays_finite_at_large_gates_and_keeps_a_nan_in_its_row():
    x = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                      [float("nan"), 1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    out = ops.silu_and_mul(x)
    torch.testing.assert_close(out[0], F.silu(x[0, :5]), rtol=1e-5, atol=1e-6)
    assert torch.isnan(out[1, 0]) and torch.isfinite(out[1, 1:]).all()


def _reference_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 300])
def test_rms_norm_matches_hugging_faces_formula(dtype, rows):
    x, weight = _rows(rows, 576, dtype), (torch.rand(576) + 0.5).to(dtype)
    _close(ops.rms_norm(x, weight, 1e-5), _reference_norm(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_adds_into_the_residual_then_normalises_the_sum(dtype):
    x, weight = _rows(33, 576, dtype), (torch.rand(576) + 0.5).to(dtype)
    residual = _rows(33, 576, dtype, scale=1.0).contiguous()
    expected_sum = residual + x
    out = ops.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(residual, expected_sum)  # the add rounds once, as PyTorch's does
    _close(out, _reference_norm(expected_sum, weight, 1e-6))


def test_the_python_fallback_agrees_with_the_kernel(monkeypatch):
    x, weight = _rows(9, 64, torch.float32), torch.rand(64) + 0.5
    residual = torch.randn(9, 64)
    kernel_residual, plain_residual = residual.clone(), residual.clone()
    kernel_out = fused.rms_norm(x, weight, 1e-5, kernel_residual)
    monkeypatch.setattr(fused, "_kernel", lambda t: False)
    plain_out = fused.rms_norm(x, weight, 1e-5, plain_residual)
    torch.testing.assert_close(kernel_out, plain_out)
    torch.testing.assert_close(kernel_residual, plain_residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_turns_q_and_k_in_place_inside_the_fused_qkv_buffer(dtype):
    tokens, heads, kv_heads, dim = 19, 9, 3, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    q = qkv[:, :heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v_before = qkv[:, (heads + kv_heads) * dim:].clone()
    angles = torch.rand(tokens, dim // 2) * 6.0
    cos, sin = angles.cos(), angles.sin()
    expected = []
    for x in (q, k):
        x1, x2 = x.float()[..., :dim // 2], x.float()[..., dim // 2:]
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        expected.append(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(dtype))
    ops.rotary_(q, k, cos, sin)
    _close(q, expected[0])
    _close(k, expected[1])
    assert torch.equal(qkv[:, (heads + kv_heads) * dim:], v_before)


def test_kernels_refuse_what_they_cannot_read():
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.silu_and_mul(torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="even width"):
        ops.silu_and_mul(torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(torch.ones(2, 4), torch.ones(5), 1e-5)
    with pytest.raises(RuntimeError, match="rows contiguous"):
        ops.rms_norm(torch.ones(4, 2).t(), torch.ones(4), 1e-5)


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 49152])
def test_greedy_rows_picks_torchs_argmax_and_flags_the_rows_nothing_can_be_drawn_from(vocab):
    """Ties keep the first index (as torch.argmax), also across the kernel's 16-wide lanes and its
    scalar tail; a NaN or +inf anywhere in a row, or a row all -inf, is flagged, and only that row."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randint(-3, 4, (12, vocab + 3), generator=g).float()[:, 1:vocab + 1]  # strided, many ties
    logits[1] = float("-inf")
    if vocab > 1:
        logits[2, vocab // 2] = float("nan")
        logits[3, vocab - 1] = float("inf")
        logits[4, -1] = 100.0  # the maximum in the tail
        logits[5, 0] = logits[5, -1] = 50.0  # a tie between the first and the last
    if vocab >= 16:  # a NaN in each of the first vector's lanes, and a row all NaN
        nan_rows = torch.full((17, vocab), 1.0)
        for lane in range(16):
            nan_rows[lane, lane] = float("nan")
        nan_rows[16] = float("nan")
        logits = torch.cat([logits, nan_rows])
    index, unusable = ops.greedy_rows(logits)
    assert bool(((index >= 0) & (index < vocab)).all())  # a broken row's index is still a valid token id
    nan_row = logits.isnan().any(dim=-1)
    assert torch.equal(index[nan_row], logits.argmax(dim=-1)[nan_row])  # torch's choice: the first NaN
    want_bad = ~logits.amax(dim=-1).isfinite()
    assert torch.equal(unusable, want_bad)
    good = ~want_bad
    assert torch.equal(index[good], logits.argmax(dim=-1)[good])
    assert bool(unusable[1]) and (vocab == 1 or (bool(unusable[2]) and bool(unusable[3])))
    plain = fused.greedy_rows(logits.double())  # not the kernel's dtype: PyTorch's ops
    assert torch.equal(plain[1], want_bad) and torch.equal(plain[0][good], index[good])
