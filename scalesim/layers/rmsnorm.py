"""Root-mean-square layer norm, computed in float32 as Hugging Face Llama does, optionally fused
with the residual add before it (layers/fused.py)."""

import torch
from torch import nn

from scalesim.layers.fused import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x); given `residual`, residual += x in place and return norm(residual)."""
        return rms_norm(x, self.weight, self.eps, residual)
