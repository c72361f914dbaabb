"""The elementwise steps of a decoder layer, each one pass over the activation on the CPU
(kernels/fused_ops.cpp, as vLLM's CPU backend does), and their plain-PyTorch definitions.

The plain definitions run wherever the kernel does not (another device or dtype, no compiler,
`SCALESIM_NO_KERNELS=1`), and the tests hold the kernel to them: equal up to float32's order of
additions in float32; in bfloat16 the kernel rounds once where PyTorch rounds intermediates.
"""

import torch
import torch.nn.functional as F

from scalesim.layers import kernel_build

SOURCE = "fused_ops.cpp"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _kernel(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and kernel_build.load(SOURCE)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = [gate | up] per row -> silu(gate) * up [T, I]."""
    if _kernel(x) and x.dim() == 2 and x.stride(1) == 1:
        return torch.ops.scalesim.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """weight * round(x / rms(x)) over the last dim, computed in float32 as Hugging Face Llama does.
    Given `residual` (same shape and dtype), first residual <- residual + x, in place, and the
    sum is what is normalised: the pre-norm residual stream in one pass."""
    if _kernel(x) and x.dim() == 2 and x.stride(1) == 1 and weight.dtype == x.dtype and (
            residual is None or (residual.dtype == x.dtype and residual.stride(1) == 1)):
        if residual is None:
            return torch.ops.scalesim.rms_norm(x, weight, eps)
        return torch.ops.scalesim.add_rms_norm(x, residual, weight, eps)
    if residual is not None:
        residual.add_(x)
        x = residual
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q [T, heads, D] and k [T, kv_heads, D] in place by cos, sin [T, D / 2] (float32),
    rotate-half convention: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), in float32."""
    if _kernel(q) and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous():
        torch.ops.scalesim.rotary_(q, k, cos, sin)
        return
    for x in (q, k):
        x.copy_(_rotated(x, cos.unsqueeze(1), sin.unsqueeze(1)))


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    half = x.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    out = torch.empty_like(x32)
    torch.addcmul(x1 * cos, x2, sin, value=-1, out=out[..., :half])
    torch.addcmul(x2 * cos, x1, sin, out=out[..., half:])
    return out.to(x.dtype)


def greedy_rows(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits [B, vocab] (float32): each row's argmax (torch.argmax's first index of the
    largest value) and whether the row is unusable (a NaN or +inf in it, or all -inf), in one
    pass over the row where the kernel runs; the unusable rows' indices mean nothing."""
    if _kernel(logits) and logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1 \
            and logits.shape[1] > 0:
        return torch.ops.scalesim.greedy_rows(logits)
    return logits.argmax(dim=-1), ~logits.amax(dim=-1).isfinite()  # amax propagates NaN: one check finds all three
