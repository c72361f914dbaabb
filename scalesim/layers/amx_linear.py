"""bfloat16 linears of few rows on AMX tiles (kernels/amx_linear.cpp), for a bfloat16 model's
decode and verify steps.

Those steps read every weight once for 1 to about 100 rows, so they are bound by the bytes they
read. oneDNN's inner product (layers/linear.py) reads them below the memory's rate there and slows
as drafted rows are added; this kernel streams the weights in order through the tiles. A chain of
all of SmolLM2-135M's linears (`scalesim microbench amx-linears`, README) measures the two side by
side; `SMALL_ROWS` is where they meet.

`AmxPacked` keeps both: the tile layout for up to `SMALL_ROWS` rows, and oneDNN's packed weight for
more (prefill), where oneDNN's blocking reuses each weight from cache better than this kernel.
That is a second copy of the linear weights (269 MB for SmolLM2-135M in bfloat16), the price of
the faster decode, paid only on CPUs with AMX-BF16 and only for the base model.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from scalesim.layers import kernel_build
from scalesim.layers.linear import OneDNNPacked

SOURCE = "amx_linear.cpp"
SMALL_ROWS = 128  # rows up to which the tiles serve; above, oneDNN (measured: `microbench amx-linears`)
STEP = 32  # the kernel's k step: K must be a multiple
_off = False


@contextmanager
def turned_off() -> Iterator[None]:
    """Models packed inside keep oneDNN for every linear (for side-by-side measurements)."""
    global _off
    _off = True
    try:
        yield
    finally:
        _off = False


def available() -> bool:
    """The kernel builds here, the CPU lends AMX-BF16 tiles to this process, and it is not turned
    off (`SCALESIM_NO_AMX_LINEAR=1` in the environment, or inside `turned_off()`)."""
    if _off or os.environ.get("SCALESIM_NO_AMX_LINEAR"):
        return False
    return kernel_build.load(SOURCE) and bool(torch.ops.scalesim.amx_linear_supported())


def fits(weight: torch.Tensor) -> bool:
    """Whether this weight can take the tile path: bfloat16 [N, K] on the CPU, K a multiple of 32."""
    return weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu" \
        and weight.shape[1] % STEP == 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight [N, K] as the kernel reads it: [ceil(N / 16), K / 32, 16, 32] bfloat16."""
    return torch.ops.scalesim.amx_linear_pack(weight.detach())


def amx_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [..., K] bfloat16 times the packed weight (+ bias): [..., out_features] bfloat16, summed in
    float32 and rounded once. A row's result does not depend on the other rows."""
    return torch.ops.scalesim.amx_linear(x, packed, bias, out_features)


class AmxPacked:
    """A bfloat16 weight for the CPU's linears on AMX: the tile layout for up to `small_rows` rows,
    oneDNN's packed layout above."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, small_rows: int = SMALL_ROWS) -> None:
        if not fits(weight):
            raise ValueError(f"AMX linear needs a bfloat16 [N, K] CPU weight with K % {STEP} == 0, got "
                             f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")
        self.tiles = pack(weight)
        self.out_features = weight.shape[0]
        self.bias = bias.float().contiguous() if bias is not None else None  # the kernel adds it in float32
        self.small_rows = small_rows
        self.large = OneDNNPacked(weight, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.device.type != "cpu":
            raise RuntimeError(f"AMX linear got {x.dtype} on {x.device}")
        if x.numel() // x.shape[-1] > self.small_rows:
            return self.large(x)
        return amx_linear(x, self.tiles, self.bias, self.out_features)
