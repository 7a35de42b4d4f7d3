"""M4's Triton attention kernels against their torch references.

On the CPU they run under the Triton interpreter (TRITON_INTERPRET=1, set here before
triton is imported when torch sees no GPU), in fp32 on tiny shapes; on a GPU the same
tests run compiled. Shapes cover GQA, head_dim not a power of two, block sizes 16 and
32, and a step that mixes a whole prompt, a prompt whose first blocks are already
cached, and decodes (`unified_attention`: both kernels).

The tests marked `gpu` (skipped without CUDA, and when TRITON_INTERPRET=1 is forced)
run the compiled kernels in bf16 and fp16 against the fp32 reference on the same
inputs: decode batches of 1, 7, 64 and 256, lengths on both sides of block boundaries,
GQA groups 1, 2, 4, 7, 8, head_dim 40, 48, 64, 80, 128, padding rows (seq_len 0) and
forced split counts, and a mixed step (the cache write, fused with the rotary
embedding, is tested in test_fused_ops.py):
`TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/test_triton_kernels.py` (under a
minute on an H100, most of it compiling).
"""

import os

import pytest
import torch  # importing torch does not import triton

# Compiled on a GPU, the interpreter on the CPU; decided before any @triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
triton = pytest.importorskip("triton")

from m4_flash_attn.ops import paged_attention as ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else "cpu"


def _batch(query_lens, cached_lens, heads, kv_heads, head_dim, block_size, seed=0):
    """A random paged cache holding each sequence's keys, its blocks shuffled in the
    pool, and the queries of each sequence's new tokens."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(cached_lens, query_lens)]
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(blocks_needed)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_needed):
        tables[i, :n] = torch.tensor(order[used:used + n])
        used += n
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g)
    starts = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return (to(q), to(k_cache), to(v_cache), to(starts),
            to(torch.tensor(seq_lens, dtype=torch.int32)), to(tables))


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [
    (4, 2, 16, 16), (4, 1, 40, 16), (2, 2, 48, 32), (6, 2, 80, 16)])
def test_unified_attention_matches_the_reference(heads, kv_heads, head_dim, block_size):
    query_lens = [19, 7, 1, 1, 33]  # a prompt, the rest after a cached prefix, 2 decodes
    cached_lens = [0, 40, 25, 16, 0]
    q, kc, vc, starts, seq_lens, tables = _batch(query_lens, cached_lens, heads, kv_heads,
                                                 head_dim, block_size)
    scale = head_dim ** -0.5
    got = ops.unified_attention(q, kc, vc, starts, seq_lens, tables, scale, num_splits=2)
    want = ops.paged_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), starts.cpu(), seq_lens.cpu(),
                                   tables.cpu(), scale)
    torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size, num_splits", [
    (4, 2, 16, 16, 2), (4, 1, 40, 16, 3), (6, 2, 80, 32, 1), (14, 2, 64, 16, 5), (8, 1, 64, 16, 16)])
def test_paged_decode_matches_the_reference(heads, kv_heads, head_dim, block_size,
                                            num_splits):
    cached_lens = [150, 1, 63, 64, 200]  # one query each, after that many cached tokens
    q, kc, vc, starts, seq_lens, tables = _batch([1] * 5, cached_lens, heads, kv_heads,
                                                 head_dim, block_size)
    scale = head_dim ** -0.5
    got = ops.paged_decode_attention(q, kc, vc, starts, seq_lens, tables, scale,
                                     num_splits=num_splits, block_n=32)
    want = ops.paged_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), starts.cpu(), seq_lens.cpu(),
                                   tables.cpu(), scale)
    torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=2e-4)


def test_paged_decode_rows_without_keys_give_zeros():
    """A query of a sequence with no keys (seq_len 0, a table of zeros) comes out as
    zeros, and does not disturb its neighbours; tiny, so the interpreter is quick."""
    heads, kv_heads, head_dim, block_size = 4, 2, 16, 16
    q, kc, vc, starts, seq_lens, tables = _batch([1] * 4, [-1, 4, -1, 19], heads, kv_heads,
                                                 head_dim, block_size)
    assert seq_lens.tolist() == [0, 5, 0, 20]
    scale = head_dim ** -0.5
    got = ops.paged_decode_attention(q, kc, vc, starts, seq_lens, tables, scale, num_splits=2,
                                     block_n=16).cpu()
    assert torch.equal(got[[0, 2]], torch.zeros_like(got[[0, 2]]))
    want = ops.paged_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), starts.cpu(), seq_lens.cpu(),
                                   tables.cpu(), scale)
    torch.testing.assert_close(got[[1, 3]], want[[1, 3]], atol=2e-4, rtol=2e-4)


# -- compiled, on the GPU, in bf16 and fp16 ---------------------------------------------
# Tolerances against the fp32 reference (same bf16/fp16 inputs, fp32 math): the kernels
# accumulate in fp32 but round the softmax weights to the input dtype before P @ V and
# round the output once. bf16 keeps 8 significant bits (relative step 2^-8 = 0.004):
# with outputs of size ~1 (see _gpu_inputs) the output rounding alone is ~0.004-0.008,
# and the weights' rounding adds about as much again, so 2e-2 leaves a margin of ~2x
# while a wrong block, head or mask (errors of order 1) cannot pass. fp16 keeps 11 bits,
# 8x finer: 5e-3.
GPU_ATOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
compiled = pytest.mark.skipif(DEVICE != "cuda", reason="needs compiled Triton on CUDA "
                                                       "(TRITON_INTERPRET=1 is set)")
BF16, FP16 = torch.bfloat16, torch.float16


def _gpu_inputs(query_lens, cached_lens, heads, kv_heads, head_dim, block_size, dtype,
                seed=0):
    """`_batch` in `dtype` on the GPU, with the queries scaled up so that the softmax is
    peaked (scores of std ~4): the output is then of size ~1 even over 4000 keys, and a
    wrong key shows (a flat softmax over many keys averages to ~0, hiding errors)."""
    q, kc, vc, starts, seq_lens, tables = _batch(query_lens, cached_lens, heads, kv_heads,
                                                 head_dim, block_size, seed=seed)
    q = 4 * q
    return (q.to(dtype), kc.to(dtype), vc.to(dtype), starts, seq_lens, tables)


def _reference(q, kc, vc, starts, seq_lens, tables, scale):
    """The fp32 reference from the very inputs the kernel saw (on the CPU)."""
    return ops.paged_attention_ref(q.float().cpu(), kc.cpu(), vc.cpu(), starts.cpu(),
                                   seq_lens.cpu(), tables.cpu(), scale)


def _assert_close(got, want, dtype):
    got = got.float().cpu()
    assert want.abs().amax() > 0.5, "the reference is too flat to catch a wrong key"
    err = (got - want).abs().max().item()
    assert err < GPU_ATOL[dtype], f"max abs err {err:.3g} >= {GPU_ATOL[dtype]}"


def _lengths(batch, high, seed):
    """`batch` sequence lengths: the block-boundary ones first, then random in [1, high]."""
    g = torch.Generator().manual_seed(seed)
    edges = [1, 15, 16, 17, 31, 32, 33]
    rest = torch.randint(1, high + 1, (max(0, batch - len(edges)),), generator=g).tolist()
    return (edges + rest)[:batch]


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("dtype, heads, kv_heads, head_dim, block_size, batch, lengths", [
    (BF16, 8, 8, 64, 16, 7, [1, 15, 16, 17, 1000, 4097, 33]),
    (FP16, 8, 4, 128, 32, 7, [4097, 1, 15, 16, 17, 1000, 32]),
    (BF16, 8, 2, 40, 16, 64, 1100),
    (FP16, 14, 2, 80, 16, 1, [4097]),
    (BF16, 16, 2, 48, 32, 256, 300),
    (FP16, 14, 2, 64, 16, 256, 700),     # qwen2.5-0.5b's attention
    (BF16, 16, 8, 128, 16, 64, 1500),    # qwen3-0.6b's attention
    (FP16, 8, 4, 40, 32, 1, [17]),
], ids=lambda v: str(v).removeprefix("torch.") if not isinstance(v, list) else "lens")
def test_gpu_paged_decode(dtype, heads, kv_heads, head_dim, block_size, batch, lengths):
    lengths = lengths if isinstance(lengths, list) else _lengths(batch, lengths, seed=batch)
    inputs = _gpu_inputs([1] * batch, [n - 1 for n in lengths], heads, kv_heads, head_dim,
                         block_size, dtype, seed=batch + head_dim)
    q, kc, vc, starts, seq_lens, tables = inputs
    scale = head_dim ** -0.5
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = ops.decode_num_splits(batch, kv_heads, num_sms=num_sms)
    got = ops.paged_decode_attention(q, kc, vc, starts, seq_lens, tables, scale,
                                     num_splits=splits)
    _assert_close(got, _reference(*inputs, scale), dtype)



@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("splits", ["auto", 1, 32])
def test_gpu_paged_decode_padding_and_splits(dtype, splits):
    """Rows without keys (seq_len 0) give zeros; the other rows are right with the split count
    the engine picks, with no split and with 32 (more splits than some rows have tiles)."""
    heads, kv_heads, head_dim, block_size = 14, 2, 64, 16
    lengths = [0, 17, 4097, 0, 1, 16, 1000, 0]
    q, kc, vc, starts, seq_lens, tables = inputs = _gpu_inputs(
        [1] * len(lengths), [n - 1 for n in lengths], heads, kv_heads, head_dim, block_size,
        dtype, seed=3)
    scale = head_dim ** -0.5
    if splits == "auto":
        splits = ops.decode_num_splits(len(lengths), kv_heads,
                                       torch.cuda.get_device_properties(0).multi_processor_count)
    got = ops.paged_decode_attention(q, kc, vc, starts, seq_lens, tables, scale,
                                     num_splits=splits)
    pad = [i for i, n in enumerate(lengths) if n == 0]
    real = [i for i, n in enumerate(lengths) if n > 0]
    assert torch.equal(got[pad].cpu(), torch.zeros_like(got[pad]).cpu())
    _assert_close(got[real], _reference(*inputs, scale)[real], dtype)



@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("dtype, heads, kv_heads, head_dim, block_size", [
    (BF16, 8, 8, 64, 16), (FP16, 8, 4, 40, 16), (BF16, 8, 2, 80, 32),
    (FP16, 14, 2, 64, 16), (BF16, 16, 2, 128, 32), (FP16, 16, 8, 48, 16)],
    ids=lambda v: str(v).removeprefix("torch."))
def test_gpu_unified_attention_mixed_batch(dtype, heads, kv_heads, head_dim, block_size):
    """One step: whole prompts (300, 15 and 1 tokens), 37 new tokens after 1000 cached
    ones, and decodes at lengths 16, 17 and 4097."""
    query_lens = [300, 37, 1, 1, 1, 15, 1]
    cached_lens = [0, 1000, 15, 16, 4096, 0, 0]
    inputs = _gpu_inputs(query_lens, cached_lens, heads, kv_heads, head_dim, block_size,
                         dtype, seed=head_dim)
    q, kc, vc, starts, seq_lens, tables = inputs
    scale = head_dim ** -0.5
    splits = ops.decode_num_splits(len(query_lens), kv_heads,
                                   torch.cuda.get_device_properties(0).multi_processor_count)
    got = ops.unified_attention(q, kc, vc, starts, seq_lens, tables, scale, splits)
    _assert_close(got, _reference(*inputs, scale), dtype)
