"""Linear and embedding layers whose weights start uninitialised: they are always loaded from a
file, so construction (on the meta device) costs nothing.

On the CPU a linear layer runs oneDNN's inner product (the kernel PyTorch's own compiler emits
for CPU linears) instead of `F.linear`, which for float32 goes to MKL's sgemm. Measured on this
machine's AMD EPYC (AVX-512), float32, the shapes of SmolLM2-135M: MKL 110-180 GFLOP/s, oneDNN
220-390 GFLOP/s at 16-3,072 rows, with the weight as it is (no packed copy, so no extra bytes).
In bfloat16 oneDNN is used only where it says it supports bf16 (AVX512-BF16, AMX or
AVX512 cores); on an AVX2-only CPU its bf16 inner product refuses to run, so there `F.linear`
computes bf16 (slowly; `--dtype auto` picks float32 on such a CPU).
"""

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


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
