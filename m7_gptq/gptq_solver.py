"""The GPTQ solver: quantize one linear layer's weight so its outputs change the least.

For y = W x on calibration inputs X, GPTQ minimizes ||W X - Q X||² with the Hessian H =
2 X Xᵀ / n. The columns are rounded one at a time, and each one's error is spread over
the columns not yet rounded (the Optimal Brain Surgeon update), with the ratios read
from one upper Cholesky factor of H⁻¹. Also: dead inputs, dampening, act-order
(`desc_act`), lazy updates in blocks of 128, and a grid per group (`fit_grid`).
`rtn_quantize` is round-to-nearest on the same grid.

Introduced in M7.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model_executor.layers.quantization.gptq import (GPTQConfig, fit_grid, from_codes,
                                                      round_to_nearest, to_codes)

BLOCK_SIZE = 128


@dataclass
class QuantizedWeight:
    """A layer's quantization, ready for `pack_layer`: codes `[out, in]`, scales and zeros
    `[groups, out]`, g_idx `[in]` (all in the original column order)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The weight `[out, in]` these codes stand for (fp32 scales)."""
        g = self.g_idx.long()
        return (self.codes - self.zeros.t()[:, g]) * self.scales.t()[:, g]


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X - Q X||² / ||W X||² on the calibration inputs, from H = 2 X Xᵀ / n:
    tr(D H Dᵀ) / tr(W H Wᵀ) with D = W - Q (the 2 / n cancels)."""
    w, d, h = weight.double(), (weight - quantized).double(), hessian.double()
    denom = ((w @ h) * w).sum()
    return float(((d @ h) * d).sum() / denom) if denom > 0 else 0.0


def inverse_hessian_factor(hessian: torch.Tensor) -> torch.Tensor:
    """U, the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U), for a positive definite H."""
    # exercise m7.1 begin
    lower = torch.linalg.cholesky(hessian)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    # exercise m7.1 end


def quantize_column(block: torch.Tensor, j: int, u_row: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round column j of `block` ([out, cols]) to its grid and spread the error over the
    block's later columns (OBS; `u_row`: U's row for this column, over the block's
    columns). Returns (codes, the scaled error (w - q) / U_jj)."""
    # exercise m7.1 begin
    w = block[:, j]
    codes = to_codes(w[:, None], scale, zero, bits)[:, 0]
    err = (w - from_codes(codes[:, None], scale, zero)[:, 0]) / u_row[j]
    block[:, j + 1:] -= err[:, None] * u_row[None, j + 1:]
    return codes, err
    # exercise m7.1 end


def prepare_hessian(weight: torch.Tensor, hessian: torch.Tensor,
                    damp_percent: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, hessian) copies in fp32 with dead inputs zeroed and the diagonal damped."""
    w, h = weight.float().clone(), hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp_percent * h.diagonal().mean())
    return w, h


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig,
                  block_size: int = BLOCK_SIZE) -> QuantizedWeight:
    """GPTQ for one layer: `weight` [out, in], `hessian` [in, in] (2 X Xᵀ / n)."""
    w, h = prepare_hessian(weight, hessian, config.damp_percent)
    out_features, in_features = w.shape
    rows = config.rows_per_group(in_features)
    perm = torch.argsort(h.diagonal(), descending=True) if config.desc_act \
        else torch.arange(in_features)
    w, h = w[:, perm], h[perm][:, perm]
    u = inverse_hessian_factor(h)
    codes = torch.zeros_like(w)
    scales, zeros = [], []
    for b0 in range(0, in_features, block_size):
        b1 = min(b0 + block_size, in_features)
        block, errors = w[:, b0:b1].clone(), torch.zeros(out_features, b1 - b0)
        for j in range(b1 - b0):
            if (b0 + j) % rows == 0:  # a new group: its grid from the current weights
                group = _current_columns(w, block, errors, u, b0, j, b0 + j + rows)
                scale, zero = fit_grid(group, config.bits, config.sym)
                scales.append(scale)
                zeros.append(zero)
            codes[:, b0 + j], errors[:, j] = quantize_column(
                block, j, u[b0 + j, b0:b1], scale, zero, config.bits)
        w[:, b1:] -= errors @ u[b0:b1, b1:]  # the block's errors, to every later column
    inverse = torch.argsort(perm)
    g_idx = (torch.arange(in_features) // rows)[inverse]
    return QuantizedWeight(codes[:, inverse], torch.stack(scales), torch.stack(zeros),
                           g_idx.to(torch.int32))


def _current_columns(w: torch.Tensor, block: torch.Tensor, errors: torch.Tensor,
                     u: torch.Tensor, b0: int, j: int, end: int) -> torch.Tensor:
    """Columns [b0 + j, end) as they stand now: those inside the block from `block`,
    those past it from `w` with the block's pending errors (columns b0..b0+j-1) applied."""
    b1 = b0 + block.shape[1]
    inside = block[:, j:min(end, b1) - b0]
    if end <= b1:
        return inside
    pending = w[:, b1:end] - errors[:, :j] @ u[b0:b0 + j, b1:end]
    return torch.cat([inside, pending], dim=1)


def rtn_quantize(weight: torch.Tensor, config: GPTQConfig) -> QuantizedWeight:
    """Round to nearest, the baseline: the format module's `round_to_nearest` (the same
    grid as GPTQ, nothing compensated), in the solver's result type."""
    return QuantizedWeight(*round_to_nearest(weight, config))
