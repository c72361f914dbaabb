"""Weight-only int8 linears on the CPU (`--quantization int8`).

Each weight is rounded to int8 with one symmetric scale per output channel (its largest |w| maps
to 127) and stored packed for kernels/int8_linear.cpp; activations, sums and outputs stay
float32. The weights take a quarter of float32's bytes, which is what bounds a decode step.
On this project's AVX2 EPYC (2 threads), a chain of all of SmolLM2-135M's linears with distinct
weights, against oneDNN's packed float32 (`microbench int8`, benchmarks/results/int8.json, the
speedup in each of three rounds): 2.5-3.5x at 1-4 rows, 1.8-2.0x at 16, 1.2-1.4x at 64, parity
at 512. There is no plain-PyTorch fallback: where the kernel is unavailable, int8 is refused.

What it costs in output is measured by `microbench accuracy --quantization int8`. Neither
PyTorch CPU operator fits, measured during development on the AVX2 EPYC (not committed): over the
same chain, `_weight_int8pack_mm` took 2.9x float32's time at 1 row and 37x at 512, and fbgemm's
dynamic int8 linear (`quantized::linear_dynamic`) quantizes the activations too, with one scale
per tensor, which made SmolLM2's greedy text part from float32's at the first generated token on
all three test prompts (at the first, second or fourth with its 7-bit activations).
"""

import torch
from torch import nn

from scalesim.layers import kernel_build
from scalesim.layers.linear import Linear

SOURCE = "int8_linear.cpp"
PANEL = 16  # output channels per packed panel (the kernel's)


def available() -> bool:
    """The kernel builds and loads here (it needs an x86 CPU with AVX2 and FMA, and a compiler)."""
    return kernel_build.load(SOURCE)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight [N, K] and float32 scale [N] with weight ~= int8 * scale[:, None] (rounded to
    nearest; an all-zero row gets scale 1)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale.contiguous()


def _require_kernel() -> None:
    if not available():
        raise ValueError("--quantization int8 needs the int8 kernel (kernels/int8_linear.cpp: an x86 CPU with "
                         "AVX2 and FMA, a C++ compiler, and SCALESIM_NO_KERNELS unset); it is unavailable here")


class Int8Weight:
    """A weight as the kernel reads it: panels of 16 output channels, k-major, [N/16, K, 16].
    Called on x [..., K] (float32, CPU) it returns x W^T + b [..., N] in float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        _require_kernel()
        if weight.device.type != "cpu" or weight.dim() != 2 or 0 in weight.shape:
            raise ValueError(f"int8 weights are CPU matrices, got {tuple(weight.shape)} on {weight.device}")
        q, self.scale = quantize_rows(weight)
        self.out_features, in_features = q.shape
        padded = torch.cat([q, q.new_zeros((-self.out_features) % PANEL, in_features)])
        self.packed = padded.view(-1, PANEL, in_features).transpose(1, 2).contiguous()
        self.bias = None if bias is None else bias.detach().float()

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [N, K] this one computes with."""
        return self.packed.transpose(1, 2).reshape(-1, self.packed.shape[1])[:self.out_features].float() * \
            self.scale[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise RuntimeError(f"int8 linear computes in float32 on the CPU, got {x.dtype} on {x.device}")
        rows = x.reshape(-1, x.shape[-1])
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.ops.scalesim.int8_linear(rows, self.packed, self.scale, self.out_features)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)


def quantize_int8(model: nn.Module, shared: set[int] = frozenset()) -> int:
    """Give every Linear of `model` an int8 weight and free its float32 one unless its id is in
    `shared` (another module reads it). Return how many were quantized. ValueError (a setting this
    machine cannot run), with the model untouched, where the kernel is unavailable."""
    _require_kernel()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    for module in linears:
        module.adopt_kernel(Int8Weight(module.weight, module.bias), id(module.weight) in shared)
    return len(linears)
