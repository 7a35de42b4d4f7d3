"""SwiGLU's `silu(gate) * up` as one Triton kernel.

Introduced in M4. Eager torch launches two kernels for it (the silu, then the multiply)
and writes the silu to memory in between; this kernel reads gate and up once and writes
the product once.

Numerics follow eager torch in the model's dtype: the silu is computed in float32 and
rounded to the dtype, then multiplied by `up` in float32 and rounded again. One program
takes one row's tile of BLOCK columns, so any intermediate size works (the last tile is
masked).
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
