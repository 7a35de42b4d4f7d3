"""Triton kernels, each beside the torch reference it is tested against. Introduced in M4.

`paged_attention.py`: the KV cache write, FlashAttention-2 style attention over the paged
cache (any number of new tokens per sequence), and flash-decoding (one new token per
sequence, the keys split across programs). `rms_norm.py`, `activation.py`, `rotary.py`:
the small per-token operations of a layer, each fused into one kernel, so that a decode
step launches a few kernels per layer instead of dozens. M7: `gptq_gemm.py`, matrix
products with GPTQ 4- or 8-bit weights, dequantized in registers.

On a machine without CUDA these kernels run only under Triton's interpreter. It must be
chosen before Triton is first imported (Triton's own library functions are kernels
too), so this package, which every kernel module is part of, chooses it.
"""

import os

import torch

if not torch.cuda.is_available():  # no GPU: the kernels run under Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


def precision_of(dtype: torch.dtype) -> str:
    """The dot products' precision for a kernel's input dtype: fp32 stays fp32 (Triton
    would round its inputs to tf32); the 16-bit types are exact in either."""
    return "ieee" if dtype == torch.float32 else "tf32"
