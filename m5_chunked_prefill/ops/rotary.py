"""Rotary position embedding (RoPE) for q and k in one Triton kernel.

The "neox" (rotate_half) style that Llama and Qwen use in Hugging Face:

    out = x * cos + rotate_half(x) * sin,    rotate_half(x) = cat(-x[d/2:], x[:d/2])

One program rotates one head of one token (q's heads, then k's), reading the float32
cos/sin tables at the token's position; the math is float32, rounded once to q's dtype.
q and k may be strided views; the results are new contiguous tensors.

Introduced in M4.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_head(src, dst, cos_row, sin_row, cols, mask, half):
    """Rotates the head at `src` (halves at src and src + half) into `dst`."""
    x1 = tl.load(src + cols, mask=mask).to(tl.float32)
    x2 = tl.load(src + half + cols, mask=mask).to(tl.float32)
    cos1 = tl.load(cos_row + cols, mask=mask).to(tl.float32)
    cos2 = tl.load(cos_row + half + cols, mask=mask).to(tl.float32)
    sin1 = tl.load(sin_row + cols, mask=mask).to(tl.float32)
    sin2 = tl.load(sin_row + half + cols, mask=mask).to(tl.float32)
    out1 = x1 * cos1 - x2 * sin1
    out2 = x2 * cos2 + x1 * sin2
    tl.store(dst + cols, out1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + half + cols, out2.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_ptr, sin_ptr,
                   q_stride_t, q_stride_h, k_stride_t, k_stride_h, table_stride,
                   num_q_heads, num_k_heads, half, HALF_BLOCK: tl.constexpr):
    token, head = tl.program_id(0), tl.program_id(1)
    pos = tl.load(pos_ptr + token)
    cos_row, sin_row = cos_ptr + pos * table_stride, sin_ptr + pos * table_stride
    cols = tl.arange(0, HALF_BLOCK)
    mask = cols < half
    if head < num_q_heads:
        _rotate_head(q_ptr + token * q_stride_t + head * q_stride_h,
                     q_out_ptr + (token * num_q_heads + head) * 2 * half,
                     cos_row, sin_row, cols, mask, half)
    else:
        kv_head = head - num_q_heads
        _rotate_head(k_ptr + token * k_stride_t + kv_head * k_stride_h,
                     k_out_ptr + (token * num_k_heads + kv_head) * 2 * half,
                     cos_row, sin_row, cols, mask, half)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, heads, d], k: [T, kv_heads, d] (last dim contiguous, same dtype);
    positions: [T] int32/int64; cos, sin: float32 [max_position, d].
    Returns (q_rotated, k_rotated), new contiguous tensors."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    assert k.shape == (num_tokens, num_k_heads, head_dim) and k.dtype == q.dtype
    assert head_dim % 2 == 0 and q.stride(-1) == 1 and k.stride(-1) == 1
    assert cos.shape == sin.shape and cos.shape[-1] == head_dim
    assert cos.stride() == sin.stride() and cos.stride(-1) == 1
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_kernel[(num_tokens, num_q_heads + num_k_heads)](
        q, k, q_out, k_out, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        num_q_heads, num_k_heads, half,
        HALF_BLOCK=triton.next_power_of_2(half), num_warps=1)
    return q_out, k_out


def apply_rotary_ref(q, k, positions, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in plain torch, in float32, rounded once to q's dtype."""
    cos = cos[positions.long()].float().unsqueeze(1)  # [T, 1, d]
    sin = sin[positions.long()].float().unsqueeze(1)

    def rotate(x):
        xf = x.float()
        half = xf.shape[-1] // 2
        rotated_half = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
        return (xf * cos + rotated_half * sin).to(x.dtype)

    return rotate(q), rotate(k)
