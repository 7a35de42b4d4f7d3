"""The flash attention backend: Triton kernels that read the KV cache's blocks in place.

Unlike the torch reference (`torch_ref.py`), which copies each sequence's keys out of
their blocks and builds gather indices on the host, the kernels in `ops/paged_attention.py`
take the common metadata as it is (in the worker's persistent buffers) and follow the
block tables themselves. Every step goes through `unified_attention`: flash-decoding for
the sequences with one new token, the varlen kernel for the others; a step of decodes
only (known on the host) runs the decode kernel alone. The split count depends only on
the number of sequences, so a CUDA graph captured for a step's size fits every mix.
Without CUDA the kernels run under Triton's interpreter (`ops/__init__.py`).

Introduced in M4.
"""

import torch

from ...ops.paged_attention import (decode_num_splits, paged_decode_attention,
                                    unified_attention, write_kv_cache)
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

    def write_kv_cache(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        write_kv_cache(k, v, k_cache, v_cache, slot_mapping)

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
