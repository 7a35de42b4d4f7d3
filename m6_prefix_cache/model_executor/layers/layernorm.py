"""RMSNorm, computed in float32 as the reference implementation does.

Given a residual, `norm(x, residual)` adds it first and returns the normed sum and the
sum (the next residual). On CUDA each form is one Triton kernel (`ops/rms_norm.py`); on
the CPU the same math runs in plain torch.

Introduced in M0; changed in M4 (one fused Triton kernel, with the residual add).
"""

import torch
from torch import nn

from ...ops.rms_norm import fused_add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); or, given a residual, (norm(x + residual), x + residual)."""
        if x.is_cuda:
            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)
