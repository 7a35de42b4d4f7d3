"""Triton kernels over the paged KV cache: one step's attention.

K/V stay where they lie: position p of a sequence is row p % block_size of block
`block_table[p // block_size]` (the step's own K/V are put there by `ops/rotary.py`).
`paged_attention` (FlashAttention-2 style: query tiles, online softmax, causal by
position) takes the sequences with several new tokens, `paged_decode_attention`
(flash-decoding: keys split, merged by log-sum-exp) those with one, and
`unified_attention` runs both on any mix. Each kernel finds its sequences on the device,
so a grid depends only on the step's size and one CUDA graph fits every mix. Each has a
torch reference (`*_ref`) that the tests compare it with.

Introduced in M4.
"""

import torch
import triton
import triton.language as tl

from . import precision_of


# -- attention ------------------------------------------------------------------------
LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); exp2 is the GPU's native one


@triton.jit
def _load_key_tile(cache_ptr, block_tables_ptr, seq, table_stride, kv_head_offset,
                   block_stride, slot_stride, key_pos, key_ok, dims, dim_ok,
                   BLOCK_SIZE: tl.constexpr):
    """Keys (or values) at positions `key_pos` of one sequence, [BLOCK_N, HEAD_DIM], read
    where they lie: position p is row p % BLOCK_SIZE of block block_table[p // BLOCK_SIZE]."""
    block = tl.load(block_tables_ptr + seq * table_stride + key_pos // BLOCK_SIZE,
                    mask=key_ok, other=0)
    rows = block * block_stride + (key_pos % BLOCK_SIZE) * slot_stride + kv_head_offset
    return tl.load(cache_ptr + rows[:, None] + dims[None, :],
                   mask=key_ok[:, None] & dim_ok[None, :], other=0.0)


@triton.jit
def _online_softmax_step(q, k, v, running_max, running_sum, acc, visible, qk_scale,
                         PRECISION: tl.constexpr):
    """Fold one tile of keys into the running max, sum and output of a tile of queries:
    scores are rescaled by exp(old max - new max) whenever the max grows."""
    # exercise m4.1 begin
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 units
    scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, 1))
    # rows with nothing visible yet keep a max of -inf: exp(-inf - -inf) would be nan
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.exp2(scores - safe_max[:, None])
    correction = tl.exp2(running_max - safe_max)
    running_sum = running_sum * correction + tl.sum(p, 1)
    acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return new_max, running_sum, acc
    # exercise m4.1 end


@triton.jit
def _first_tile(query_start_ptr, seq, BLOCK_M: tl.constexpr):
    """The program id of sequence `seq`'s first query tile. Sequence i's tiles start
    at query_start[i] // BLOCK_M + i: never before the end of the tiles of the ones
    before it, however their lengths fall, so a grid of T // BLOCK_M + B programs covers
    every tile of a batch of T tokens and B sequences (some programs get none)."""
    return tl.load(query_start_ptr + seq) // BLOCK_M + seq


@triton.jit
def _sequence_of_program(query_start_ptr, num_seqs, program, BLOCK_M: tl.constexpr):
    """The last sequence whose first tile is at or before `program` (binary search)."""
    # exercise m4.3 begin
    low = tl.zeros((), dtype=tl.int32)  # _first_tile(low) <= program < _first_tile(high)
    high = low + num_seqs
    while high - low > 1:
        mid = (low + high) // 2
        if _first_tile(query_start_ptr, mid, BLOCK_M) <= program:
            low = mid
        else:
            high = mid
    return low
    # exercise m4.3 end


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
        query_start_ptr, seq_lens_ptr, block_tables_ptr,
        qk_scale, num_seqs, group, head_dim,
        q_row_stride, q_head_stride, block_stride, slot_stride, kv_head_stride,
        table_stride,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr):
    # Which sequence and tile this program takes is found here, on the device, so the
    # grid depends only on the batch's shape (a CUDA graph fixes it), not on its lengths.
    seq = _sequence_of_program(query_start_ptr, num_seqs, tl.program_id(0), BLOCK_M)
    tile = tl.program_id(0) - _first_tile(query_start_ptr, seq, BLOCK_M)
    head = tl.program_id(1)
    kv_head_offset = (head // group) * kv_head_stride

    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    # A sequence with one query (a decode) is the decode kernel's.
    if (q_len > 1) & (tile * BLOCK_M < q_len):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
        row_ok = rows < q_len
        positions = seq_len - q_len + rows  # each query's position in its sequence
        dims = tl.arange(0, HEAD_DIM)
        dim_ok = dims < head_dim
        q = tl.load(q_ptr + (q_start + rows)[:, None] * q_row_stride + head * q_head_stride
                    + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

        running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        offsets = tl.arange(0, BLOCK_N)
        first = seq_len - q_len + tile * BLOCK_M  # the tile's first query position
        # Key tiles every query of the tile sees whole: no mask to compute.
        unmasked_end = (first + 1) // BLOCK_N * BLOCK_N
        for start in tl.range(0, unmasked_end, BLOCK_N, num_stages=NUM_STAGES):
            key_pos = start + offsets
            key_ok = key_pos < seq_len
            k = _load_key_tile(k_cache_ptr, block_tables_ptr, seq, table_stride, kv_head_offset,
                               block_stride, slot_stride, key_pos, key_ok, dims, dim_ok,
                               BLOCK_SIZE)
            v = _load_key_tile(v_cache_ptr, block_tables_ptr, seq, table_stride, kv_head_offset,
                               block_stride, slot_stride, key_pos, key_ok, dims, dim_ok,
                               BLOCK_SIZE)
            running_max, running_sum, acc = _online_softmax_step(
                q, k, v, running_max, running_sum, acc, key_ok[None, :], qk_scale, PRECISION)
        # Then the tiles along the diagonal, where a key may come after a query.
        end = tl.minimum(first + BLOCK_M, seq_len)  # keys the tile's last query sees
        for start in tl.range(unmasked_end, end, BLOCK_N):
            key_pos = start + offsets
            key_ok = key_pos < seq_len
            k = _load_key_tile(k_cache_ptr, block_tables_ptr, seq, table_stride, kv_head_offset,
                               block_stride, slot_stride, key_pos, key_ok, dims, dim_ok,
                               BLOCK_SIZE)
            v = _load_key_tile(v_cache_ptr, block_tables_ptr, seq, table_stride, kv_head_offset,
                               block_stride, slot_stride, key_pos, key_ok, dims, dim_ok,
                               BLOCK_SIZE)
            visible = (key_pos[None, :] <= positions[:, None]) & key_ok[None, :]
            running_max, running_sum, acc = _online_softmax_step(
                q, k, v, running_max, running_sum, acc, visible, qk_scale, PRECISION)
        out = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
        tl.store(out_ptr + (q_start + rows)[:, None] * q_row_stride + head * q_head_stride
                 + dims[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & dim_ok[None, :])


def prefill_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes for the varlen kernel: the fastest in a sweep on an H100 over both
    models' shapes (tools/tune_attention.py; bench/results/tune-attention-h100-*.json)."""
    if dtype == torch.float32:  # the CPU tests: small tiles for the interpreter
        return dict(block_m=32, block_n=32, num_warps=4, num_stages=1)
    return dict(block_m=64, block_n=64, num_warps=4, num_stages=3)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                    **config) -> torch.Tensor:
    """q: [T, heads, d], the new tokens of B sequences one after the other; the caches:
    [num_blocks, block_size, kv_heads, d]. Returns [T, heads, d] (into `out` if given),
    written for the sequences with more than one new token only (the rows of those with
    one are left as they were, for the decode kernel; `unified_attention` runs both).
    `config` overrides the tile sizes of `prefill_config` (block_m, block_n,
    num_warps, num_stages)."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    q = q.contiguous()
    out = torch.empty_like(q) if out is None else out
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    cfg = prefill_config(head_dim, q.dtype) | config
    block_n = max(cfg["block_n"], block_size)
    grid = (num_tokens // cfg["block_m"] + num_seqs, num_heads)  # see _first_tile
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
        scale * LOG2_E, num_seqs, num_heads // num_kv_heads, head_dim,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        BLOCK_M=cfg["block_m"], BLOCK_N=block_n, BLOCK_SIZE=block_size,
        HEAD_DIM=triton.next_power_of_2(head_dim), PRECISION=precision_of(q.dtype),
        NUM_STAGES=cfg["num_stages"], num_warps=cfg["num_warps"])
    return out


def paged_attention_ref(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
                        scale: float) -> torch.Tensor:
    """Sequence by sequence in plain torch: gather its keys through the block table,
    softmax over the visible ones, in fp32."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[i], starts[i + 1]
        positions = torch.arange(seq_len)
        blocks = block_tables[i, positions // block_size].cpu()
        k = k_cache[blocks, positions % block_size].float()  # [L, kv_heads, d]
        v = v_cache[blocks, positions % block_size].float()
        group = num_heads // num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        query_pos = seq_len - (end - start) + torch.arange(end - start)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale
        scores = scores.masked_fill(positions[None, None, :] > query_pos[None, :, None],
                                    float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


# -- decode: one query per sequence, the keys split across programs -------------------
@triton.jit
def _paged_decode_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
        query_start_ptr, seq_lens_ptr, block_tables_ptr,
        qk_scale, group, head_dim, num_splits,
        q_row_stride, q_head_stride, block_stride, slot_stride, kv_head_stride,
        table_stride,
        GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
        ONE_SPLIT: tl.constexpr):
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_heads = tl.num_programs(1) * group
    kv_head_offset = kv_head * kv_head_stride
    # The sequence's query is row q_start of the batch. One with more new tokens (a
    # prompt, or part of one) is the varlen kernel's: here it reads no key, writes nothing.
    q_start = tl.load(query_start_ptr + seq)
    is_decode = tl.load(query_start_ptr + seq + 1) - q_start == 1
    seq_len = tl.where(is_decode, tl.load(seq_lens_ptr + seq), 0)
    rows = tl.arange(0, GROUP_PAD)  # the query heads that share this kv head
    row_ok = rows < tl.where(is_decode, group, 0)
    heads = kv_head * group + rows
    dims = tl.arange(0, HEAD_DIM)
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + q_start * q_row_stride + heads[:, None] * q_head_stride + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    offsets = tl.arange(0, BLOCK_N)
    # This sequence's key tiles, shared out evenly among the splits. The split count is
    # fixed (a CUDA graph fixes the grid); each sequence divides its own length by it.
    num_tiles = (seq_len + BLOCK_N - 1) // BLOCK_N
    tiles_per_split = (num_tiles + num_splits - 1) // num_splits
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for t in tl.range(first, last, num_stages=NUM_STAGES):  # BLOCK_N keys, several blocks
        key_pos = t * BLOCK_N + offsets
        key_ok = key_pos < seq_len
        k = _load_key_tile(k_cache_ptr, block_tables_ptr, seq, table_stride, kv_head_offset,
                           block_stride, slot_stride, key_pos, key_ok, dims, dim_ok, BLOCK_SIZE)
        v = _load_key_tile(v_cache_ptr, block_tables_ptr, seq, table_stride, kv_head_offset,
                           block_stride, slot_stride, key_pos, key_ok, dims, dim_ok, BLOCK_SIZE)
        running_max, running_sum, acc = _online_softmax_step(
            q, k, v, running_max, running_sum, acc, key_ok[None, :], qk_scale, PRECISION)
    # this split's result, normalized (zeros when it saw no key)
    out = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
    if ONE_SPLIT:  # the whole answer: straight to the output
        tl.store(out_ptr + q_start * q_row_stride + heads[:, None] * q_head_stride + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:  # and its log-sum-exp (base 2; -inf when it saw no key), for the merge
        # exercise m4.2 begin
        lse = tl.where(running_sum == 0.0, float("-inf"),
                       running_max + tl.log2(tl.where(running_sum == 0.0, 1.0, running_sum)))
        # exercise m4.2 end
        part = (seq * num_heads + heads) * num_splits + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], out,
                 mask=row_ok[:, None] & dim_ok[None, :])
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, query_start_ptr, num_splits,
                         head_dim, out_row_stride, out_head_stride,
                         SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One (sequence, head): the splits' outputs weighted by exp(lse - max lse)."""
    seq, head = tl.program_id(0), tl.program_id(1)
    part = (seq * tl.num_programs(1) + head) * num_splits
    # Decodes only, at their own rows: the decode kernel wrote no split of the others.
    q_start = tl.load(query_start_ptr + seq)
    is_decode = tl.load(query_start_ptr + seq + 1) - q_start == 1
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < tl.where(is_decode, num_splits, 0)
    dims = tl.arange(0, HEAD_DIM)
    # exercise m4.2 begin
    lse = tl.load(part_lse_ptr + part + splits, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    weights = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # 0 for empty splits
    parts = tl.load(part_out_ptr + (part + splits)[:, None] * HEAD_DIM + dims[None, :],
                    mask=split_ok[:, None], other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(weights[:, None] * parts, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + q_start * out_row_stride + head * out_head_stride + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < tl.where(is_decode, head_dim, 0))
    # exercise m4.2 end


def decode_num_splits(num_seqs: int, num_kv_heads: int, num_sms: int = 132,
                      max_splits: int = 32) -> int:
    """How many pieces to cut each sequence's keys into so that about two programs per
    streaming multiprocessor run even when the batch is small (a function of the batch
    shape only, so that a CUDA graph captured for this step size fits every step)."""
    return max(1, min(max_splits, triton.cdiv(2 * num_sms, num_seqs * num_kv_heads)))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                           block_tables: torch.Tensor, scale: float, num_splits: int,
                           out: torch.Tensor | None = None, block_n: int = 128,
                           num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """The sequences with one new token (decodes): q [T, heads, d] -> [T, heads, d] (into
    `out` if given), written at their rows (the others are the varlen kernel's). Each
    program takes one sequence, one kv head and all the query heads that share it, over
    one split of the keys; with several splits a second kernel merges them by their
    log-sum-exp (flash-decoding), so even one long sequence keeps many programs busy. A
    sequence of length 0 gets zeros."""
    num_heads, head_dim = q.shape[1:]
    num_seqs = seq_lens.shape[0]
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    block_n = max(block_n, block_size)
    head_pad = triton.next_power_of_2(head_dim)
    q = q.contiguous()
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    one_split = num_splits == 1
    parts = (num_seqs, num_heads, num_splits)
    part_out = out if one_split else torch.empty(*parts, head_pad, device=q.device,
                                                  dtype=torch.float32)
    part_lse = out if one_split else torch.empty(*parts, device=q.device, dtype=torch.float32)
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, query_start_loc, seq_lens, block_tables,
        scale * LOG2_E, group, head_dim, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_SIZE=block_size, HEAD_DIM=head_pad, PRECISION=precision_of(q.dtype),
        NUM_STAGES=num_stages, ONE_SPLIT=one_split, num_warps=num_warps)
    if not one_split:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, query_start_loc, num_splits, head_dim, out.stride(0),
            out.stride(1), SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_pad)
    return out


def unified_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      block_tables: torch.Tensor, scale: float,
                      num_splits: int) -> torch.Tensor:
    """One step's attention, whatever it mixes: q [T, heads, d] -> [T, heads, d]. The
    decodes go through flash-decoding, the others (whole prompts or parts of them) through
    the varlen kernel, each skipping the other's sequences, into one output. Both grids
    depend only on T, B and num_splits, so a CUDA graph of a step fits any mix of the
    same size. Rows of no sequence (padding tokens) are left unwritten."""
    out = torch.empty_like(q)
    paged_decode_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
                           scale, num_splits, out=out)
    return paged_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
                           scale, out=out)
