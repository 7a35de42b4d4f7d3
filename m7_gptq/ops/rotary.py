"""Rotary position embedding (RoPE) for q and k in one Triton kernel, which may also
write the step's keys and values into the paged KV cache.

The "neox" (rotate_half) style of Llama and Qwen in Hugging Face: out = x * cos +
rotate_half(x) * sin, with rotate_half(x) = cat(-x[d/2:], x[:d/2]). One program takes
one head of one token (q's heads, then k's), reading the float32 cos/sin tables at the
token's position; the math is float32, rounded once to q's dtype. `rotary_and_write_kv`
stores each rotated key, and its value, straight into the token's cache slot (the cache
write is no kernel of its own), after Qwen3's per-head q/k RMSNorm if asked. Inputs may
be strided views (of one merged q/k/v projection).

Introduced in M4.
"""

import torch
import triton
import triton.language as tl

from .rms_norm import rms_norm_ref


@triton.jit
def _rms_normed(x1, x2, w_ptr, cols, mask, half, eps, dtype: tl.constexpr):
    """Qwen3's q/k norm of one head given as its halves (float32, zeros where masked),
    with the reference's roundings: normalised and rounded, times the weight, rounded."""
    inv_rms = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * half) + eps)
    w1 = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + half + cols, mask=mask, other=0.0).to(tl.float32)
    y1 = (w1 * (x1 * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    y2 = (w2 * (x2 * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return y1, y2


@triton.jit
def _rotate_head(src, dst, cos_row, sin_row, cols, mask, half, w_ptr, eps,
                 NORM: tl.constexpr):
    """Rotates the head at `src` (halves at src and src + half) into `dst`; with NORM,
    RMS-normalises it first (weight at `w_ptr`)."""
    x1 = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + cols, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        x1, x2 = _rms_normed(x1, x2, w_ptr, cols, mask, half, eps, dst.dtype.element_ty)
    cos1 = tl.load(cos_row + cols, mask=mask).to(tl.float32)
    cos2 = tl.load(cos_row + half + cols, mask=mask).to(tl.float32)
    sin1 = tl.load(sin_row + cols, mask=mask).to(tl.float32)
    sin2 = tl.load(sin_row + half + cols, mask=mask).to(tl.float32)
    out1 = x1 * cos1 - x2 * sin1
    out2 = x2 * cos2 + x1 * sin2
    tl.store(dst + cols, out1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + half + cols, out2.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, v_out_ptr, pos_ptr, slot_ptr,
                   cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, eps, q_stride_t, q_stride_h,
                   k_stride_t, k_stride_h, v_stride_t, v_stride_h, out_stride_t,
                   table_stride, num_q_heads, num_k_heads, half, HALF_BLOCK: tl.constexpr,
                   TO_CACHE: tl.constexpr, NORM: tl.constexpr):
    """Program (token, head): q's heads go to q_out; k's to k_out's row for the token, or
    with TO_CACHE to its cache slot (row `slot`, none for -1), with the head of v. With
    NORM each q and k head is RMS-normalised before it is rotated."""
    token, head = tl.program_id(0), tl.program_id(1)
    pos = tl.load(pos_ptr + token)
    cos_row, sin_row = cos_ptr + pos * table_stride, sin_ptr + pos * table_stride
    cols = tl.arange(0, HALF_BLOCK)
    mask = cols < half
    if head < num_q_heads:
        _rotate_head(q_ptr + token * q_stride_t + head * q_stride_h,
                     q_out_ptr + (token * num_q_heads + head) * 2 * half,
                     cos_row, sin_row, cols, mask, half, q_norm_ptr, eps, NORM)
    else:
        kv_head = head - num_q_heads
        row = token
        if TO_CACHE:
            row = tl.load(slot_ptr + token)
            mask = cols < tl.where(row >= 0, half, 0)  # -1: a padding token, written nowhere
        out = row * out_stride_t + kv_head * 2 * half
        _rotate_head(k_ptr + token * k_stride_t + kv_head * k_stride_h, k_out_ptr + out,
                     cos_row, sin_row, cols, mask, half, k_norm_ptr, eps, NORM)
        if TO_CACHE:  # v's head, as it is, in two halves like k's
            v_src = v_ptr + token * v_stride_t + kv_head * v_stride_h
            tl.store(v_out_ptr + out + cols, tl.load(v_src + cols, mask=mask), mask=mask)
            tl.store(v_out_ptr + out + half + cols, tl.load(v_src + half + cols, mask=mask),
                     mask=mask)


def _check_shapes(q, k, cos, sin) -> None:
    num_tokens, _, head_dim = q.shape
    assert k.shape == (num_tokens, k.shape[1], head_dim) and k.dtype == q.dtype
    assert head_dim % 2 == 0 and q.stride(-1) == 1 and k.stride(-1) == 1
    assert cos.shape == sin.shape and cos.shape[-1] == head_dim
    assert cos.stride() == sin.stride() and cos.stride(-1) == 1


def _launch(q, k, v, q_out, k_out, v_out, positions, slots, cos, sin, to_cache,
            qk_norm=None) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    half = head_dim // 2
    q_norm, k_norm, eps = qk_norm if qk_norm is not None else (cos, cos, 0.0)
    if qk_norm is not None:
        assert q_norm.shape == k_norm.shape == (head_dim,), (q_norm.shape, k_norm.shape)
    _rotary_kernel[(num_tokens, num_q_heads + k.shape[1])](
        q, k, v, q_out, k_out, v_out, positions, slots, cos, sin, q_norm, k_norm, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k.shape[1] * head_dim, cos.stride(0), num_q_heads, k.shape[1], half,
        HALF_BLOCK=triton.next_power_of_2(half), TO_CACHE=to_cache,
        NORM=qk_norm is not None, num_warps=1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, heads, d], k: [T, kv_heads, d] (last dim contiguous, same dtype);
    positions: [T] int32/int64; cos, sin: float32 [max_position, d].
    Returns (q_rotated, k_rotated), new contiguous tensors."""
    _check_shapes(q, k, cos, sin)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.shape[0]:
        _launch(q, k, k, q_out, k_out, k_out, positions, positions, cos, sin, False)
    return q_out, k_out


def rotary_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor,
                        qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
                        ) -> torch.Tensor:
    """As `apply_rotary`, but the rotated k, and v ([T, kv_heads, d]), go into the caches
    ([num_blocks, block_size, kv_heads, d]) at `slot_mapping` ([T]; -1: nowhere).
    `qk_norm` (Qwen3's q_norm and k_norm weights, [d] each, and eps): each q and k head
    is RMS-normalised first. Returns the rotated q, a new contiguous tensor."""
    _check_shapes(q, k, cos, sin)
    assert v.shape == k.shape and v.stride(-1) == 1 and v.dtype == k.dtype
    assert k_cache.shape[-2:] == k.shape[1:] and k_cache.is_contiguous()
    assert v_cache.shape == k_cache.shape and v_cache.is_contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0]:
        _launch(q, k, v, q_out, k_cache, v_cache, positions, slot_mapping, cos, sin, True,
                qk_norm)
    return q_out


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


def rotary_and_write_kv_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
                            qk_norm=None) -> torch.Tensor:
    """The same in plain torch: normalise (if asked), rotate, write each real slot's row."""
    if qk_norm is not None:
        q_norm, k_norm, eps = qk_norm
        q, k = rms_norm_ref(q, q_norm, eps), rms_norm_ref(k, k_norm, eps)
    q_out, k_out = apply_rotary_ref(q, k, positions, cos, sin)
    real = slot_mapping >= 0
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping[real].long(), k_out[real])
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping[real].long(), v[real])
    return q_out

