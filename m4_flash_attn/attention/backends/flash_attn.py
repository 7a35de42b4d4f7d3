"""The flash attention backend: Triton kernels that read the KV cache's blocks in place.

Unlike the torch reference (`torch_ref.py`), which copies each sequence's keys out of
their blocks, the kernels in `ops/paged_attention.py` take the common metadata as it is
(in the worker's persistent buffers) and follow the block tables themselves:
flash-decoding for the sequences with one new token, the varlen kernel for the others
(`unified_attention`; a step of decodes only runs the decode kernel alone). The split
count depends only on the number of sequences, so a CUDA graph captured for a step's
size fits every mix. Before attending, one kernel (`ops/rotary.py`) norms (Qwen3) and
rotates q and k and writes k and v into the cache. Off CUDA: Triton's interpreter.

Introduced in M4.
"""

import torch

from ...ops.paged_attention import decode_num_splits, paged_decode_attention, unified_attention
from ...ops.rotary import rotary_and_write_kv
from ..metadata import AttentionMetadata


def multiprocessor_count(device: torch.device) -> int:
    """How many programs the GPU runs at once, roughly (one per SM); 1 on the CPU."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


class FlashAttention:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.scale = head_dim, scale
        self.num_sms: int | None = None  # read from the device on first use

    def rotate_and_write_kv(self, rotary, qk_norm, positions: torch.Tensor, q: torch.Tensor,
                            k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """One kernel: q (normed and) rotated, returned; k (normed and) rotated and v
        written to their slots."""
        cos, sin = rotary.tables(q.device)
        norms = None if qk_norm is None else (qk_norm[0].weight, qk_norm[1].weight,
                                              qk_norm[0].eps)
        return rotary_and_write_kv(q, k, v, positions, cos, sin, k_cache, v_cache,
                                   slot_mapping, norms)

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:
        """q: [T, heads, d]; caches: [num_blocks, block_size, kv_heads, d] -> [T, heads * d]."""
        if self.num_sms is None:
            self.num_sms = multiprocessor_count(q.device)
        splits = decode_num_splits(md.seq_lens.shape[0], self.num_kv_heads, self.num_sms)
        if md.max_query_len == 1:  # decodes only: the varlen kernel would find no work
            out = paged_decode_attention(q, k_cache, v_cache, md.query_start_loc, md.seq_lens,
                                         md.block_tables, self.scale, splits)
        else:
            out = unified_attention(q, k_cache, v_cache, md.query_start_loc, md.seq_lens,
                                    md.block_tables, self.scale, splits)
        return out.view(q.shape[0], self.num_heads * self.head_dim)
