"""Triton kernels, each beside the torch reference it is tested against.

`paged_attention.py`: FlashAttention-2 style attention over the paged cache, and
flash-decoding. `rms_norm.py`, `activation.py`, `rotary.py` (with the KV cache write): a
layer's small per-token operations, each fused into one kernel. `gptq_gemm.py`: matmuls with
GPTQ 4- or 8-bit weights, dequantized in registers; `gptq_pack.py`: the bit layout they
read.

Without CUDA the kernels run under Triton's interpreter, chosen here, before Triton is
first imported; `precision_of` gives a dtype's dot-product precision.

Introduced in M4; changed in M7 (the GPTQ kernels).
"""

import os

import torch

if not torch.cuda.is_available():  # no GPU: the kernels run under Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


def precision_of(dtype: torch.dtype) -> str:
    """The dot products' precision for a kernel's input dtype: fp32 stays fp32 (Triton
    would round its inputs to tf32); the 16-bit types are exact in either."""
    return "ieee" if dtype == torch.float32 else "tf32"
