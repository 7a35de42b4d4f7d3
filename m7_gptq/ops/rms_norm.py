"""RMSNorm as one Triton kernel, and RMSNorm fused with the residual add before it.

`rms_norm(x, weight, eps)` normalises x over its last dimension (the hidden states, or
Qwen3's per-head q/k norm on a strided view); `fused_add_rms_norm` first adds the
residual (the decoder layer's `residual = x + residual`) and normalises the sum, in one
pass over memory. One program normalises one row with the torch reference's numerics
(float32, rounded to x's dtype, then times the weight and rounded again); H is padded to
a power of two and masked.

Introduced in M4.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _normalize_and_store(x, w_ptr, out_ptr, cols, mask, hidden, eps):
    """x: one row in float32 (zeros past `hidden`); writes weight * normalised x."""
    y = x * tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    y = y.to(out_ptr.dtype.element_ty).to(tl.float32)  # the reference's y.to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask).to(tl.float32)
    tl.store(out_ptr + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_0, stride_1, hidden, eps,
                     BLOCK: tl.constexpr):
    """Program (i, j) normalises x[i, j, :]; the output is contiguous."""
    i, j = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + i * stride_0 + j * stride_1 + cols, mask=mask, other=0.0)
    out_row = out_ptr + (i * tl.num_programs(1) + j) * hidden
    _normalize_and_store(x.to(tl.float32), w_ptr, out_row, cols, mask, hidden, eps)


@triton.jit
def _fused_add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
                               x_stride, res_stride, hidden, eps, BLOCK: tl.constexpr):
    """Program i: new_res[i] = x[i] + res[i] (rounded to the dtype); out[i] = norm of it."""
    i = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + i * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + i * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(new_res_ptr.dtype.element_ty)
    tl.store(new_res_ptr + i * hidden + cols, s, mask=mask)
    _normalize_and_store(s.to(tl.float32), w_ptr, out_ptr + i * hidden, cols, mask,
                         hidden, eps)


def _launch_options(hidden: int) -> dict:
    block = triton.next_power_of_2(hidden)
    return {"BLOCK": block, "num_warps": min(max(block // 256, 1), 8)}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H] with a contiguous last dimension; weight: [H]. Returns a new
    contiguous tensor of x's shape and dtype."""
    hidden = x.shape[-1]
    assert x.stride(-1) == 1 and weight.shape == (hidden,), (x.stride(), weight.shape)
    # [rows, sub_rows, H]: 2-D x is [T, 1, H]; 3-D x (maybe strided) is used as it is
    x3 = x.reshape(-1, x.shape[-2], hidden) if x.dim() >= 3 else x.reshape(-1, 1, hidden)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    _rms_norm_kernel[(x3.shape[0], x3.shape[1])](
        x3, weight, out, x3.stride(0), x3.stride(1), hidden, eps, **_launch_options(hidden))
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [..., H], same shape and dtype. Returns (normed, new_residual), new
    tensors: new_residual = x + residual, normed = rms_norm(new_residual)."""
    hidden = x.shape[-1]
    assert x.shape == residual.shape and x.dtype == residual.dtype, (x.shape, residual.shape)
    assert weight.shape == (hidden,), weight.shape
    x2, r2 = x.reshape(-1, hidden), residual.reshape(-1, hidden)
    assert x2.stride(-1) == 1 and r2.stride(-1) == 1
    normed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(normed)
    if normed.numel() == 0:
        return normed, new_residual
    _fused_add_rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, normed, new_residual, x2.stride(0), r2.stride(0), hidden, eps,
        **_launch_options(hidden))
    return normed, new_residual


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The same in plain torch (M0's RMSNorm)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def fused_add_rms_norm_ref(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in plain torch: the add, then the norm."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual
