"""Linear and embedding layers whose weights start uninitialised: they are always loaded from a
file, so construction (on the meta device) costs nothing.

On the CPU a linear layer runs oneDNN's inner product (the kernel PyTorch's own compiler emits
for CPU linears) instead of `F.linear`, which for float32 goes to MKL's sgemm. Measured on this
machine's AMD EPYC (AVX-512), float32, the shapes of SmolLM2-135M: MKL 110-180 GFLOP/s, oneDNN
220-390 GFLOP/s at 16-3,072 rows, with the weight as it is (no packed copy, so no extra bytes).
In bfloat16 oneDNN is used only where it says it supports bf16 (AVX512-BF16, AMX or
AVX512 cores); on an AVX2-only CPU its bf16 inner product refuses to run, so there `F.linear`
computes bf16 (slowly; `--dtype auto` picks float32 on such a CPU).

`pack_for_cpu` (called by the engine on its base model) goes one step further, as vLLM's CPU
backend does: each weight is reordered once into oneDNN's blocked layout for a 16-row batch and
the plain copy is freed. Measured on this session's AVX2 EPYC, fp32, a chain of all of
SmolLM2-135M's linears with distinct weights (so they stream from memory as in a real step):
parity at 1 row, 1.2-1.4x faster at 4-16 rows (decode batches), 1.1-1.2x at 64-512 rows.
A tied output head packs a copy of the embedding (the embedding itself stays plain).
On a CPU with AMX-BF16 a bfloat16 weight also gets the tile kernel's layout (layers/amx_linear.py),
which serves up to 128 rows (decode and verify steps) faster than oneDNN.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16) if _HAS_ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
    else (torch.float32,)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, by oneDNN on the CPU where it can, else by `F.linear`."""
    if _HAS_ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in _ONEDNN_DTYPES:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


PACK_ROWS_HINT = 16  # the batch oneDNN's blocked layout is chosen for (decode batches; measured above)


class OneDNNPacked:
    """A weight reordered once into oneDNN's blocked layout (float32 or bfloat16, CPU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.packed.dtype or x.device.type != "cpu":
            raise RuntimeError(f"packed {self.packed.dtype} linear got {x.dtype} on {x.device}")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class Linear(nn.Module):
    """y = x W^T + b. `kernel`, once set (`pack_for_cpu`, or layers/weight_only.py's
    `compress_weights`), computes it from its own copy of the weight, and the plain one is freed
    unless another module shares it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.kernel: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)
        return linear(x, self.weight, self.bias)

    def adopt_kernel(self, kernel: Callable[[torch.Tensor], torch.Tensor], shared: bool = False) -> None:
        """Compute with `kernel` from now on; free the plain weight unless `shared`."""
        self.kernel = kernel
        if not shared:
            self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)

    def pack_for_cpu(self, shared: bool = False) -> bool:
        """Reorder the weight into oneDNN's blocked layout, and for a bfloat16 weight on a CPU with
        AMX-BF16 into the tile kernel's too (layers/amx_linear.py); free the plain one (keep it
        when `shared`: another module uses it). False, changing nothing, where oneDNN cannot run it."""
        weight = self.weight
        if not (_HAS_ONEDNN and weight.device.type == "cpu" and weight.dtype in _ONEDNN_DTYPES and self.kernel is None):
            return False
        from scalesim.layers import amx_linear  # it imports this module

        tiles = amx_linear.fits(weight) and amx_linear.available()
        self.adopt_kernel(amx_linear.AmxPacked(weight, self.bias) if tiles else OneDNNPacked(weight, self.bias), shared)
        return True


def pack_for_cpu(model: nn.Module, shared: set[int] = frozenset()) -> int:
    """Pack every Linear of a model that will not be reloaded or moved (the engine's base model);
    `shared` holds ids of weights other modules use too. Return how many were packed."""
    return sum(m.pack_for_cpu(id(m.weight) in shared) for m in model.modules() if isinstance(m, Linear))


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
