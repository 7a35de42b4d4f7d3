"""The bit layout of GPTQ checkpoints, in plain torch: what the kernels read.

`pack` / `unpack`: integer codes <-> int32 words, 32 / bits codes per word along a
dimension, the first in the lowest bits (qweight packs along the input dim, qzeros
along the output dim). `dequantize`: the weight a checkpoint stands for, (q - z) * s
with z the stored zero plus `zero_offset` (1 in format v1, which stores z - 1; 0 in
v2), row i in group g_idx[i]: the one torch reference the kernels and the CPU path are
checked against.

Introduced in M7.
"""

from __future__ import annotations

import torch


def pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) along `dim`: 32 / bits consecutive codes per
    int32, the first in the lowest bits. `dim`'s size must be a multiple of 32 / bits."""
    # exercise m7.2 begin
    per_word = 32 // bits
    codes = codes.movedim(dim, -1).to(torch.int64)
    if codes.shape[-1] % per_word:
        raise ValueError(f"pack: {codes.shape[-1]} codes along dim {dim} is not a multiple "
                         f"of {per_word}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2 ** bits):
        raise ValueError(f"pack: codes must lie in [0, {2 ** bits})")
    words = codes.reshape(*codes.shape[:-1], -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64, device=codes.device) * bits
    packed = (words << shifts).sum(-1)  # the fields do not overlap: sum == bitwise or
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)  # as a signed int32
    return packed.to(torch.int32).movedim(-1, dim).contiguous()
    # exercise m7.2 end


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of `pack`: int32 words -> int32 codes, 32 / bits times longer on `dim`."""
    # exercise m7.2 begin
    per_word = 32 // bits
    words = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64, device=packed.device) * bits
    codes = (words.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    codes = codes.reshape(*words.shape[:-1], -1)
    return codes.to(torch.int32).movedim(-1, dim).contiguous()
    # exercise m7.2 end


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               g_idx: torch.Tensor, bits: int, zero_offset: int = 1) -> torch.Tensor:
    """The checkpoint's weight, `[in, out]` in the scales' dtype: (q - z) * s, where z is
    the stored zero plus `zero_offset` (1: format v1; 0: v2), row i using group
    g_idx[i]."""
    # exercise m7.4 begin
    codes = unpack(qweight, bits, dim=0)
    zeros = unpack(qzeros, bits, dim=1) + zero_offset
    g = g_idx.long()
    return ((codes - zeros[g]).to(scales.dtype) * scales[g])
    # exercise m7.4 end
