"""Weight-only formats for the CPU's linears (`--quantization fp16` or `int8`): the weights are
stored smaller, the activations, sums and outputs stay float32 (kernels/weight_only_linear.cpp).

- `fp16`: each weight rounded to float16 (11 significant bits; SmolLM2's weights are far inside its
  range). Half of float32's bytes.
- `int8`: each weight rounded to int8 with one symmetric scale per output channel (its largest |w|
  maps to 127). A quarter of float32's bytes.

A decode step is bound by the bytes of weights it reads. On this project's AVX2 EPYC (2 threads),
a chain of all of SmolLM2-135M's linears with distinct weights, against oneDNN's packed float32
(`microbench int8`, benchmarks/results/int8.json, the speedup in each of three rounds), int8 ran
2.5-3.5x at 1-4 rows, 1.8-2.0x at 16, 1.2-1.4x at 64, parity at 512. In the engine, against
float32 weights in two runs (`microbench peer`, peer-weights-avx2.json and
peer-default-avx2.json), fp16 decoded 1.5-2.0x as fast at batch 1 and 16; prefill was 0.90-1.05x,
inside those runs' spreads. What each format costs in output is
measured by `microbench accuracy --quantization ...`. There is no plain-PyTorch
fallback: where the kernel is unavailable, the format is refused.

Neither PyTorch CPU int8 operator fits, measured during development on the AVX2 EPYC (not
committed): over the same chain, `_weight_int8pack_mm` took 2.9x float32's time at 1 row and 37x
at 512, and fbgemm's dynamic int8 linear (`quantized::linear_dynamic`) quantizes the activations
too, with one scale per tensor, which made SmolLM2's greedy text part from float32's at the first
generated token on all three test prompts (at the first, second or fourth with its 7-bit
activations). fbgemm's float16 linear (`quantized::linear_dynamic_fp16`) computes what `fp16`
does, and over the chain about as fast (medians of three interleaved rounds, fbgemm against this
kernel: 14.3 / 14.2 ms at 1 row, 17.2 / 15.4 at 4, 42.0 / 42.2 at 16; development measurement, not
committed), but a row's result depends on the rows batched with it, which this kernel's does not.
"""

from collections.abc import Callable

import torch
from torch import nn

from scalesim.layers import kernel_build
from scalesim.layers.linear import Linear

SOURCE = "weight_only_linear.cpp"
PANEL = 16  # output channels per packed panel (the kernel's)


def available() -> bool:
    """The kernel builds and loads here (an x86 CPU with AVX2, FMA and F16C, and a compiler)."""
    return kernel_build.load(SOURCE)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight [N, K] and float32 scale [N] with weight ~= int8 * scale[:, None] (rounded to
    nearest; an all-zero row gets scale 1)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale.contiguous()


def half_rows(weight: torch.Tensor) -> tuple[torch.Tensor, None]:
    """float16 weight [N, K] (rounded to nearest), no scale. ValueError where a weight is past
    float16's range (|w| > 65504), which would become infinite."""
    half = weight.detach().to(torch.float16)
    if not torch.isfinite(half).all() and torch.isfinite(weight).all():
        raise ValueError(f"a weight of {weight.abs().max().item():g} is past float16's range: "
                         "use --quantization none (or int8)")
    return half, None


# How each format stores a weight [N, K]: (stored values [N, K], float32 scale [N] or None).
ENCODE: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]] = {
    "fp16": half_rows, "int8": quantize_rows}


def _require_kernel(fmt: str) -> None:
    if not available():
        raise ValueError(f"--quantization {fmt} needs the weight-only kernel (kernels/weight_only_linear.cpp: an "
                         "x86 CPU with AVX2, FMA and F16C, a C++ compiler, and SCALESIM_NO_KERNELS unset); it is "
                         "unavailable here")


class PackedWeight:
    """A weight in format `fmt` (a key of ENCODE) as the kernel reads it: panels of 16 output
    channels, k-major, [N/16, K, 16]. Called on x [..., K] (float32, CPU) it returns
    x W^T + b [..., N] in float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> None:
        _require_kernel(fmt)
        if weight.device.type != "cpu" or weight.dim() != 2 or 0 in weight.shape:
            raise ValueError(f"{fmt} weights are CPU matrices, got {tuple(weight.shape)} on {weight.device}")
        stored, self.scale = ENCODE[fmt](weight)
        self.out_features, in_features = stored.shape
        padded = torch.cat([stored, stored.new_zeros((-self.out_features) % PANEL, in_features)])
        self.packed = padded.view(-1, PANEL, in_features).transpose(1, 2).contiguous()
        self.bias = None if bias is None else bias.detach().float()

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [N, K] this one computes with."""
        weight = self.packed.transpose(1, 2).reshape(-1, self.packed.shape[1])[:self.out_features].float()
        return weight if self.scale is None else weight * self.scale[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise RuntimeError(f"weight-only linear computes in float32 on the CPU, got {x.dtype} on {x.device}")
        rows = x.reshape(-1, x.shape[-1])
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.ops.scalesim.weight_only_linear(rows, self.packed, self.scale, self.out_features)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)


def compress_weights(model: nn.Module, fmt: str, shared: set[int] = frozenset()) -> int:
    """Give every Linear of `model` a weight in format `fmt` (a key of ENCODE) and free its
    float32 one unless its id is in `shared` (another module reads it). Return how many were
    compressed. ValueError (a setting this machine cannot run), with the model untouched, where
    the kernel is unavailable."""
    _require_kernel(fmt)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    for module in linears:
        module.adopt_kernel(PackedWeight(module.weight, module.bias, fmt), id(module.weight) in shared)
    return len(linears)
