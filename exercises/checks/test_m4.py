"""Checks of M4's exercises: the online softmax step, flash-decoding's merge, a program
finding its sequence, the CUDA graphs' step sizes. The kernels run under Triton's
interpreter on the CPU (TRITON_INTERPRET=1), in fp32, on tiny shapes; each is compared
with a plain torch attention written here. Each test runs on its exercise's package."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

m41 = pytest.mark.exercise("m4.1")
m42 = pytest.mark.exercise("m4.2")
m43 = pytest.mark.exercise("m4.3")
m44 = pytest.mark.exercise("m4.4")

LOG2_E = 1.4426950408889634
TOL = dict(atol=2e-4, rtol=2e-4)


# --- a plain torch attention over a paged cache -----------------------------------------

def paged_batch(query_lens, seq_lens, heads, kv_heads, head_dim, block_size, seed=0):
    """A random paged cache (blocks shuffled in the pool) and each sequence's queries:
    sequence i has query_lens[i] new tokens, the last of its seq_lens[i] positions."""
    g = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 2
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(seq_lens), max(1, max(blocks_needed)), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_needed):
        tables[i, :n] = torch.tensor(order[used:used + n], dtype=torch.int32)
        used += n
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    q = 2 * torch.randn(sum(query_lens), heads, head_dim, generator=g)  # a peaked softmax
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, k_cache, v_cache, starts, torch.tensor(seq_lens, dtype=torch.int32), tables


def attention(q, k_cache, v_cache, starts, seq_lens, tables, scale):
    """Causal attention by position, sequence by sequence, in float64: what every kernel
    here must give. A query with no keys gives zeros."""
    heads, kv_heads, block_size = q.shape[1], k_cache.shape[2], k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[i].item(), starts[i + 1].item()
        if seq_len == 0 or end == start:
            continue
        rows = [tables[i, p // block_size].item() for p in range(seq_len)]
        k = torch.stack([k_cache[b, p % block_size] for p, b in enumerate(rows)]).double()
        v = torch.stack([v_cache[b, p % block_size] for p, b in enumerate(rows)]).double()
        k = k.repeat_interleave(heads // kv_heads, dim=1)  # [L, heads, d]
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        query_pos = torch.arange(seq_len - (end - start), seq_len)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].double(), k) * scale
        hidden = torch.arange(seq_len)[None, None, :] > query_pos[None, :, None]
        weights = scores.masked_fill(hidden, float("-inf")).softmax(-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", weights, v)
    return out


def rows_of(starts, which):
    """The token rows of the sequences for which which(num_new_tokens) holds."""
    starts = starts.tolist()
    return [r for i in range(len(starts) - 1) if which(starts[i + 1] - starts[i])
            for r in range(starts[i], starts[i + 1])]


# --- m4.1: the online softmax step ----------------------------------------------------

@triton.jit
def _fold_tile(q_ptr, k_ptr, v_ptr, visible_ptr, max_ptr, sum_ptr, acc_ptr, qk_scale,
               M: tl.constexpr, N: tl.constexpr, D: tl.constexpr, STEP: tl.constexpr):
    """Runs STEP (the stage's _online_softmax_step) once on a [M, N] tile; the running
    state is read from and written back to max/sum/acc."""
    rows, cols, dims = tl.arange(0, M), tl.arange(0, N), tl.arange(0, D)
    q = tl.load(q_ptr + rows[:, None] * D + dims[None, :])
    k = tl.load(k_ptr + cols[:, None] * D + dims[None, :])
    v = tl.load(v_ptr + cols[:, None] * D + dims[None, :])
    visible = tl.load(visible_ptr + rows[:, None] * N + cols[None, :]) != 0
    running_max = tl.load(max_ptr + rows)
    running_sum = tl.load(sum_ptr + rows)
    acc = tl.load(acc_ptr + rows[:, None] * D + dims[None, :])
    running_max, running_sum, acc = STEP(q, k, v, running_max, running_sum, acc, visible,
                                         qk_scale, "ieee")
    tl.store(max_ptr + rows, running_max)
    tl.store(sum_ptr + rows, running_sum)
    tl.store(acc_ptr + rows[:, None] * D + dims[None, :], acc)


class Folded:
    """The running state of 16 queries, folded tile by tile through the stage's step."""

    def __init__(self, stage, q, scale):
        self.step = stage("ops.paged_attention")._online_softmax_step
        self.q, self.qk_scale = q, scale * LOG2_E
        self.max = torch.full((q.shape[0],), float("-inf"))
        self.sum = torch.zeros(q.shape[0])
        self.acc = torch.zeros(q.shape)

    def fold(self, k, v, visible):
        m, d = self.q.shape
        _fold_tile[(1,)](self.q, k, v, visible.to(torch.int32).contiguous(), self.max,
                         self.sum, self.acc, self.qk_scale, M=m, N=k.shape[0], D=d,
                         STEP=self.step)


def softmax_of(q, k, v, visible, scale):
    """float64: (max in log2 units, sum of exp2(score - max), unnormalized output)."""
    scores = (q.double() @ k.double().T) * scale * LOG2_E
    scores = scores.masked_fill(~visible, float("-inf"))
    top = scores.max(1).values
    p = torch.exp2(scores - top.masked_fill(top == float("-inf"), 0)[:, None])
    return top, p.sum(1), p @ v.double()


def tile(seed, n=16, d=16, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=g)


@m41
def test_one_tile_from_the_start(stage):
    q, k, v = tile(0), tile(1), tile(2)
    visible = torch.rand(16, 16, generator=torch.Generator().manual_seed(3)) < 0.6
    visible[:, 5] = True  # every row sees a key
    state = Folded(stage, q, 0.25)
    state.fold(k, v, visible)
    top, total, acc = softmax_of(q, k, v, visible, 0.25)
    torch.testing.assert_close(state.max.double(), top, **TOL)
    torch.testing.assert_close(state.sum.double(), total, **TOL)
    torch.testing.assert_close(state.acc.double(), acc, **TOL)


@m41
def test_a_larger_max_rescales_what_came_before(stage):
    """The second tile's scores are larger: the first tile's sum and output must be
    scaled down to the new max; the end result is the softmax over both tiles."""
    q, k1, v1, k2, v2 = tile(10), tile(11), tile(12), tile(13, scale=3.0), tile(14)
    state = Folded(stage, q, 0.5)
    everything = torch.ones(16, 16, dtype=torch.bool)
    state.fold(k1, v1, everything)
    state.fold(k2, v2, everything)
    k, v = torch.cat([k1, k2]), torch.cat([v1, v2])
    top, total, acc = softmax_of(q, k, v, torch.ones(16, 32, dtype=torch.bool), 0.5)
    torch.testing.assert_close(state.max.double(), top, **TOL)
    torch.testing.assert_close(state.sum.double(), total, **TOL)
    torch.testing.assert_close(state.acc.double(), acc, **TOL)
    want = torch.softmax(q.double() @ k.double().T * 0.5, 1) @ v.double()
    torch.testing.assert_close((state.acc / state.sum[:, None]).double(), want, **TOL)


@m41
def test_rows_that_see_nothing_yet(stage):
    """Rows 8-15 see no key of the first tile: their max stays -inf, sum and output 0
    (not nan); after the second tile they hold the softmax over its keys alone."""
    q, k1, v1, k2, v2 = tile(20), tile(21), tile(22), tile(23), tile(24)
    first = torch.zeros(16, 16, dtype=torch.bool)
    first[:8, :] = True
    first[3, 9:] = False  # and some keys hidden from some rows
    state = Folded(stage, q, 0.3)
    state.fold(k1, v1, first)
    assert torch.isinf(state.max[8:]).all() and (state.max[8:] < 0).all()
    assert torch.equal(state.sum[8:], torch.zeros(8))
    assert torch.equal(state.acc[8:], torch.zeros(8, 16))
    second = torch.ones(16, 16, dtype=torch.bool)
    second[:, 12:] = False
    state.fold(k2, v2, second)
    assert not torch.isnan(state.acc).any() and not torch.isnan(state.sum).any()
    k, v = torch.cat([k1, k2]), torch.cat([v1, v2])
    top, total, acc = softmax_of(q, k, v, torch.cat([first, second], 1), 0.3)
    torch.testing.assert_close(state.max.double(), top, **TOL)
    torch.testing.assert_close(state.sum.double(), total, **TOL)
    torch.testing.assert_close(state.acc.double(), acc, **TOL)


@m41
def test_varlen_kernel_over_several_key_tiles(stage):
    """The varlen kernel (32-key tiles in fp32): a 70-token prompt, a 20-token chunk
    after 50 cached tokens, a decode (not this kernel's: left as it was), GQA."""
    ops = stage("ops.paged_attention")
    inputs = paged_batch([70, 20, 1], [70, 70, 41], heads=4, kv_heads=2, head_dim=16,
                         block_size=16, seed=1)
    out = torch.full(inputs[0].shape, 7.0)
    got = ops.paged_attention(*inputs, scale=0.25, out=out)
    want = attention(*inputs, 0.25)
    rows = rows_of(inputs[3], lambda n: n > 1)
    torch.testing.assert_close(got[rows].double(), want[rows], **TOL)
    assert torch.equal(got[90], torch.full((4, 16), 7.0))


@m41
def test_decode_kernel_in_one_split(stage):
    ops = stage("ops.paged_attention")
    inputs = paged_batch([1, 1, 1], [100, 1, 33], heads=4, kv_heads=1, head_dim=16,
                         block_size=16, seed=2)
    got = ops.paged_decode_attention(*inputs, scale=0.25, num_splits=1, block_n=32)
    torch.testing.assert_close(got.double(), attention(*inputs, 0.25), **TOL)


# --- m4.2: flash-decoding's merge -------------------------------------------------------

NEG_INF = float("-inf")


@m42
def test_merge_weighs_each_split_by_its_log_sum_exp(stage):
    """Direct: hand-made splits (lse in base 2). Sequence 1 has 3 new tokens: not a
    decode, its rows are left alone. Empty splits (-inf) weigh nothing, huge lse values
    (2^200 overflows fp32) still merge, a decode with no key at all gives zeros."""
    ops = stage("ops.paged_attention")
    num_seqs, heads, splits, head_dim, head_pad = 3, 2, 3, 5, 8
    g = torch.Generator().manual_seed(5)
    part_out = torch.randn(num_seqs, heads, splits, head_pad, generator=g)
    part_lse = torch.tensor([[[3.0, 1.0, NEG_INF], [200.0, 201.0, 199.0]],
                             [[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]],
                             [[NEG_INF, NEG_INF, NEG_INF], [NEG_INF, 5.0, NEG_INF]]])
    part_out[0, 0, 2] = 1e6  # an empty split's output: weight 0
    starts = torch.tensor([0, 1, 4, 5], dtype=torch.int32)
    out = torch.full((5, heads, head_dim), 7.0)
    ops._merge_splits_kernel[(num_seqs, heads)](
        part_out, part_lse, out, starts, splits, head_dim, out.stride(0), out.stride(1),
        SPLITS_PAD=4, HEAD_DIM=head_pad)

    def merged(s, h):
        lse = part_lse[s, h].double()
        w = torch.exp2(lse - lse.max())
        return (w[:, None] * part_out[s, h, :, :head_dim].double()).sum(0) / w.sum()
    torch.testing.assert_close(out[0, 0].double(), merged(0, 0), **TOL)
    torch.testing.assert_close(out[0, 1].double(), merged(0, 1), **TOL)
    assert torch.equal(out[1:4], torch.full((3, heads, head_dim), 7.0))  # not a decode
    assert torch.equal(out[4, 0], torch.zeros(head_dim))  # no key in any split
    torch.testing.assert_close(out[4, 1], part_out[2, 1, 1, :head_dim], **TOL)


@m42
@pytest.mark.parametrize("num_splits", [3, 8])
def test_decode_kernel_in_splits(stage, num_splits):
    """Lengths of 0 to 150 keys in 16-key tiles: some splits get no tile, a sequence of
    length 0 none at all (zeros)."""
    ops = stage("ops.paged_attention")
    inputs = paged_batch([1] * 5, [150, 1, 0, 33, 64], heads=4, kv_heads=2, head_dim=16,
                         block_size=16, seed=3 + num_splits)
    got = ops.paged_decode_attention(*inputs, scale=0.25, num_splits=num_splits, block_n=16)
    assert torch.equal(got[2], torch.zeros(4, 16))
    torch.testing.assert_close(got.double(), attention(*inputs, 0.25), **TOL)


# --- m4.3: a program finds its sequence -------------------------------------------------

@triton.jit
def _programs_sequences(query_start_ptr, num_seqs, out_ptr, BLOCK_M: tl.constexpr,
                        FIND: tl.constexpr):
    program = tl.program_id(0)
    tl.store(out_ptr + program, FIND(query_start_ptr, num_seqs, program, BLOCK_M))


def sequences_of_programs(stage, query_lens, block_m):
    """What the stage's _sequence_of_program says for every program of the varlen
    kernel's grid (T // BLOCK_M + B programs)."""
    find = stage("ops.paged_attention")._sequence_of_program
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    num_programs = starts[-1].item() // block_m + len(query_lens)
    out = torch.full((num_programs,), -1, dtype=torch.int32)
    _programs_sequences[(num_programs,)](starts, len(query_lens), out, BLOCK_M=block_m,
                                         FIND=find)
    return out.tolist()


def expected_sequences(query_lens, block_m):
    """Program p takes the last sequence i whose first tile, start_i // BLOCK_M + i, is
    at or before p."""
    starts = [sum(query_lens[:i]) for i in range(len(query_lens))]
    first = [start // block_m + i for i, start in enumerate(starts)]
    programs = sum(query_lens) // block_m + len(query_lens)
    return [max(i for i in range(len(first)) if first[i] <= p) for p in range(programs)]


@m43
@pytest.mark.parametrize("query_lens, block_m", [
    ([5], 16), ([40], 16), ([1, 1, 1, 1], 16), ([5, 0, 0, 40, 1, 33, 16], 16),
    ([16, 16, 17, 15, 0, 1, 32], 16), ([3, 9, 1, 0, 7, 2, 12, 4, 4], 4), ([0, 0, 20], 8)])
def test_every_program_finds_its_sequence(stage, query_lens, block_m):
    want = expected_sequences(query_lens, block_m)
    assert sequences_of_programs(stage, query_lens, block_m) == want


@m43
def test_varlen_kernel_on_many_sequences(stage):
    """Seven sequences of all sizes (one-token decodes and empty padding ones are not
    this kernel's), 16-query tiles: each query tile must find its own sequence."""
    ops = stage("ops.paged_attention")
    query_lens, seq_lens = [17, 1, 2, 0, 33, 16, 5], [17, 9, 20, 0, 40, 16, 5]
    inputs = paged_batch(query_lens, seq_lens, heads=2, kv_heads=1, head_dim=16,
                         block_size=16, seed=7)
    got = ops.paged_attention(*inputs, scale=0.3, block_m=16, block_n=16)
    rows = rows_of(inputs[3], lambda n: n > 1)
    torch.testing.assert_close(got[rows].double(), attention(*inputs, 0.3)[rows], **TOL)


# --- m4.4: the CUDA graphs' step sizes --------------------------------------------------

SIXTEENS = list(range(16, 257, 16))


@m44
@pytest.mark.parametrize("max_num_tokens, max_batch_size, want", [
    (1, 1, [1]),
    (8, 5, [1, 2, 4, 5, 8]),
    (20, 3, [1, 2, 3, 4, 8, 16, 20]),
    (48, 48, [1, 2, 4, 8, 16, 32, 48]),
    (100, 256, [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100]),
    (600, 4000, [1, 2, 4, 8] + SIXTEENS + [320, 384, 448, 512, 600]),
    (2048, 256, [1, 2, 4, 8] + SIXTEENS + [320, 384, 448, 512, 768, 1024, 1280, 1536,
                                           1792, 2048]),
    (5000, 300, [1, 2, 4, 8] + SIXTEENS + [300, 320, 384, 448, 512, 768, 1024, 1280,
                                           1536, 1792, 2048]),
    (8192, 4000, [1, 2, 4, 8] + SIXTEENS + [320, 384, 448, 512, 768, 1024, 1280, 1536,
                                            1792, 2048]),  # batches past the largest: eager
    (1000, 100, [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100] + SIXTEENS[6:]
     + [320, 384, 448, 512, 768, 1000]),
])
def test_graph_token_sizes(stage, max_num_tokens, max_batch_size, want):
    cuda_graph = stage("worker.cuda_graph")
    assert cuda_graph.LARGEST_GRAPH_TOKENS == 2048
    assert cuda_graph.graph_token_sizes(max_num_tokens, max_batch_size) == want


@m44
def test_padded_size_is_the_smallest_that_holds_the_step(stage):
    padded_size = stage("worker.cuda_graph").padded_size
    sizes = [1, 2, 4, 8, 16, 32, 48]
    want = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8, 9: 16, 17: 32, 32: 32, 33: 48, 48: 48}
    for n, size in want.items():
        assert padded_size(sizes, n) == size, n
    assert padded_size(sizes, 49) is None and padded_size(sizes, 1000) is None
    assert padded_size([], 1) is None
    assert padded_size([48, 4, 16, 8], 5) == 8  # sizes in any order
    assert padded_size([48, 4, 16, 8], 17) == 48


@m44
def test_every_step_has_a_graph_up_to_the_largest(stage):
    cuda_graph = stage("worker.cuda_graph")
    sizes = cuda_graph.graph_token_sizes(700, 300)
    for n in range(1, 701):
        size = cuda_graph.padded_size(sizes, n)
        assert size is not None and size >= n and not any(n <= s < size for s in sizes), n
    assert cuda_graph.padded_size(sizes, 701) is None
    assert cuda_graph.padded_size(sizes, 300) == 300  # a full batch of decodes: no padding
