"""SwiGLU's `silu(gate) * up` as one Triton kernel.

Eager torch launches two kernels for it and writes the silu to memory in between; this
one reads gate and up once and writes the product once. The numerics are eager torch's
in the model's dtype: the silu in float32, rounded, then the product in float32, rounded
again. One program takes one row's tile of BLOCK columns (the last tile masked).

Introduced in M4.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(gate_ptr, up_ptr, out_ptr, gate_stride, up_stride, width,
                         BLOCK: tl.constexpr):
    row, tile = tl.program_id(0), tl.program_id(1)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    g = tl.load(gate_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (silu * u).to(out_ptr.dtype.element_ty),
             mask=mask)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [T, I] (same shape and dtype; rows may be strided views, e.g. the two
    halves of one merged projection). Returns a new contiguous [T, I] tensor."""
    assert gate.shape == up.shape and gate.dtype == up.dtype, (gate.shape, up.shape)
    width = gate.shape[-1]
    g2, u2 = gate.reshape(-1, width), up.reshape(-1, width)
    assert g2.stride(-1) == 1 and u2.stride(-1) == 1
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    grid = (g2.shape[0], triton.cdiv(width, BLOCK))
    _silu_and_mul_kernel[grid](g2, u2, out, g2.stride(0), u2.stride(0), width,
                               BLOCK=BLOCK, num_warps=4)
    return out


def silu_and_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The same in plain torch."""
    return F.silu(gate) * up
