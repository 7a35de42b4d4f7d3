"""W4A16 / W8A16 matmul: activations in bf16/fp16/fp32 times GPTQ-packed integer weights.

`gptq_matmul(x, qweight, scales, qzeros, group_size, bits)`: x @ W, W[k, n] = (q[k, n] -
z[g, n]) * scales[g, n], g = k // group_size, on the checkpoint's tensors as they are
(the layer has put its rows in group order). W is dequantized in registers with no
int-to-float instruction: a code ORed into the bits of the fp32 2^23 reads as 2^23 + q,
and minus 2^23 + z (made the same way, once per group) it is q - z exactly. By rows M:
split-K GEMV for M = 1 (scales once per K-step), tensor-core tiles with split K up to
16, then the weight written out for cuBLAS (`path="prefill"`: fused tiles). Splits
depend on the shapes alone (CUDA graphs fit). `gptq_matmul_ref`: the torch reference.

Introduced in M7.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from .gptq_pack import dequantize
from . import precision_of

PATHS = ("gemv", "decode", "prefill", "dequant")
DECODE_MAX_M = 16  # up to this many rows (from 2): the decode configuration
DEQUANT_MIN_M = 17  # from this many rows: dequantize, then a dense matmul
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRETER_SMS = 4  # a pretend multiprocessor count under the interpreter: a few splits

# Launch settings per path. On the GPU: the fastest of `tools/bench_gptq_kernels.py
# --sweep` on an H100 at qwen2.5-0.5b's shapes (bench/results/gptq-kernels-h100-
# 20261127-011243.json, the sweep these were picked from). Under the interpreter (the
# CPU tests): small tiles.
GPU_CONFIGS = {
    "gemv": dict(block_n=64, block_k=64, num_warps=4, num_stages=3, fill=4,
                 last_adds=True),
    "dequant": dict(block_n=512, num_warps=4),
    "decode": dict(block_m=16, block_n=32, block_k=256, num_warps=4, num_stages=3, fill=1,
                   words_once=True),
    "prefill": dict(block_m=64, block_n=64, block_k=128, num_warps=8, num_stages=3, fill=0,
                    words_once=True),
}
INTERPRETER_CONFIGS = {
    "gemv": dict(block_n=32, block_k=32, num_warps=4, num_stages=1, fill=2,
                 last_adds=True),
    "dequant": dict(block_n=32, num_warps=4),
    "decode": dict(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1, fill=2,
                   words_once=True),
    "prefill": dict(block_m=32, block_n=32, block_k=32, num_warps=4, num_stages=1, fill=0,
                    words_once=True),
}
MIN_BLOCK = 16  # tl.dot's smallest tile side
SUM_BLOCK = 256  # outputs per program of the kernel that adds the splits


# -- the kernels ----------------------------------------------------------------------
@triton.jit
def _plus_two_pow_23(codes):
    """Integer codes in [0, 2^23) -> the fp32 2^23 + code, exactly: the code ORed into the
    mantissa of 2^23 (its bits 0x4B000000) and the word read as a float. One bitwise
    instruction (or none: the GPU's three-input bitwise op does the mask before it too),
    where an int-to-float conversion runs at a quarter of the fp32 rate on Hopper."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _biased_zeros(qzeros_ptr, groups, cols, col_ok, N, BITS: tl.constexpr,
                  ZERO_OFFSET: tl.constexpr):
    """The zero points of `groups` x `cols` (broadcast against each other) as the fp32
    2^23 + z: unpacked from qzeros (packed along the columns), plus the format's offset
    (1: v1 stores z - 1; 0: v2), made a float like the codes. Once per group and column:
    their cost is spread over the group's rows."""
    PER_WORD: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    words = tl.load(qzeros_ptr + groups * (N // PER_WORD) + cols // PER_WORD, mask=col_ok,
                    other=0)
    return _plus_two_pow_23(((words >> ((cols % PER_WORD) * BITS)) & MASK) + ZERO_OFFSET)


@triton.jit
def _unpacked_codes(qweight_ptr, k0, cols, col_ok, N, BITS: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, WORDS_ONCE: tl.constexpr):
    """The codes of rows [k0, k0 + BLOCK_K) x columns `cols`, int32 [BLOCK_K, BLOCK_N].
    Row k sits in word k // PER_WORD at bit (k % PER_WORD) * BITS. Two ways to cut them
    out: WORDS_ONCE loads each word once and spreads its PER_WORD codes over PER_WORD
    rows (a reshape of [words, PER_WORD, BLOCK_N]); otherwise each row loads its own
    word (PER_WORD rows load the same one, which the cache serves) and shifts it. The
    first issues fewer load instructions, the second is simpler to read; the
    benchmark's --sweep times both."""
    PER_WORD: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    if WORDS_ONCE:
        word_rows = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
        words = tl.load(qweight_ptr + word_rows[:, None] * N + cols[None, :],
                        mask=col_ok[None, :], other=0)
        shifts = tl.arange(0, PER_WORD) * BITS
        codes = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & MASK,
                           [BLOCK_K, BLOCK_N])
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        words = tl.load(qweight_ptr + (k // PER_WORD)[:, None] * N + cols[None, :],
                        mask=col_ok[None, :], other=0)
        # >> on int32 keeps the sign bit, but the mask drops whatever it shifted in
        codes = (words >> ((k % PER_WORD) * BITS)[:, None]) & MASK
    return codes


@triton.jit
def _dequantized_tile(qweight_ptr, scales_ptr, qzeros_ptr, k0, cols, col_ok, N,
                      BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_N: tl.constexpr, WORDS_ONCE: tl.constexpr,
                      ZERO_OFFSET: tl.constexpr):
    """Rows [k0, k0 + BLOCK_K) x columns `cols` of W in the scales' dtype (x's): (q - z) *
    scale with each row's group's zero points and scales. q - z, (2^23 + q) - (2^23 + z)
    in fp32, is an integer that bf16 and fp16 hold exactly, so the product is taken in
    the scales' dtype (two per instruction on a GPU) and rounds as the fp32 one would.
    The tile lies inside one group (BLOCK_K <= GROUP_SIZE), or covers whole groups
    (BLOCK_K a multiple of GROUP_SIZE): then it is seen as [groups, GROUP_SIZE, BLOCK_N]
    and each group's row of scales and zeros is broadcast over its rows, with no
    per-element gather."""
    GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
    codes = _plus_two_pow_23(_unpacked_codes(qweight_ptr, k0, cols, col_ok, N, BITS,
                                             BLOCK_K, BLOCK_N, WORDS_ONCE))
    groups = k0 // GROUP_SIZE + tl.arange(0, GROUPS)
    scale = tl.load(scales_ptr + groups[:, None] * N + cols[None, :], mask=col_ok[None, :],
                    other=0.0)
    zero = _biased_zeros(qzeros_ptr, groups[:, None], cols[None, :], col_ok[None, :], N,
                         BITS, ZERO_OFFSET)
    if GROUPS == 1:
        return (codes - zero).to(scale.dtype) * scale
    codes = tl.reshape(codes, [GROUPS, BLOCK_K // GROUPS, BLOCK_N])
    w = (codes - zero[:, None, :]).to(scale.dtype) * scale[:, None, :]
    return tl.reshape(w, [BLOCK_K, BLOCK_N])


@triton.jit
def _gptq_gemm_kernel(x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, bias_ptr, out_ptr,
                      M, N, K, k_per_split, x_row_stride, split_stride, HAS_BIAS: tl.constexpr,
                      BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      WORDS_ONCE: tl.constexpr, PRECISION: tl.constexpr,
                      ZERO_OFFSET: tl.constexpr):
    """Program (n, m, s): output tile (m, n) summed over rows [s, s + 1) * k_per_split
    of K (the last split stops at K), stored at out + s * split_stride (the fp32 partial
    sums when K is split, the output itself in x's dtype when not). K and k_per_split
    are multiples of BLOCK_K."""
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + k[None, :],
                    mask=row_ok[:, None], other=0.0)
        w = _dequantized_tile(qweight_ptr, scales_ptr, qzeros_ptr, k0, cols, col_ok, N,
                              BITS, GROUP_SIZE, BLOCK_K, BLOCK_N, WORDS_ONCE, ZERO_OFFSET)
        acc += tl.dot(x, w, input_precision=PRECISION)
    if HAS_BIAS:  # only when K is not split (else the kernel adding the splits adds it)
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + split * split_stride + rows[:, None] * N + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sum_splits_kernel(partial_ptr, bias_ptr, out_ptr, size, N, num_splits,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = partial[0, i] + partial[1, i] + ... (+ the column's bias) in fp32, in that
    order (the same result every run), rounded to out's dtype."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < size
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(num_splits):
        total += tl.load(partial_ptr + s * size + i, mask=ok, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + i % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, total.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gptq_gemv_kernel(x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, bias_ptr, out_ptr,
                      partial_ptr, counters_ptr, N, K, k_per_split, code_mask,
                      HAS_BIAS: tl.constexpr, BITS: tl.constexpr,
                      GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                      WORD_ROWS: tl.constexpr, NUM_SPLITS: tl.constexpr,
                      LAST_ADDS: tl.constexpr, ZERO_OFFSET: tl.constexpr):
    """One row of x (M = 1) times the packed weight, without tensor cores: program
    (n, s) reads WORD_ROWS rows of words x BLOCK_N columns per step (all in one group).
    Per weight, four instructions: a shift; one bitwise op that masks the code and makes
    it the float 2^23 + q; the subtraction of 2^23 + z; the multiply-add with its x, in
    fp32. The step's sums are multiplied by the columns' scales once, at the end of the
    step (a step lies inside one group); the sum over K happens once, at the end.
    `code_mask` is 2^BITS - 1, passed at run time: as a constant the compiler turns the
    shift and mask into a bit-field extract (two instructions on Hopper, plus the OR).
    With K split, each program writes its fp32 partial sum; with LAST_ADDS the program
    that finishes last for its column tile (an atomic counter per tile says which) adds
    the partial sums in split order and writes the output, so there is no second launch
    (else `_sum_splits_kernel` does it)."""
    PER_WORD: tl.constexpr = 32 // BITS
    pid_n, split = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    word_rows = tl.arange(0, WORD_ROWS)
    acc = tl.zeros([WORD_ROWS, BLOCK_N], dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, WORD_ROWS * PER_WORD):
        words = tl.load(qweight_ptr + (k0 // PER_WORD + word_rows)[:, None] * N
                        + cols[None, :], mask=col_ok[None, :], other=0)
        group = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + group * N + cols, mask=col_ok, other=0.0).to(tl.float32)
        zero = _biased_zeros(qzeros_ptr, group, cols, col_ok, N, BITS, ZERO_OFFSET)
        step = tl.zeros([WORD_ROWS, BLOCK_N], dtype=tl.float32)  # sum of x * (q - z)
        for j in tl.static_range(PER_WORD):  # code j of every word: rows k0 + PER_WORD*r + j
            x = tl.load(x_ptr + k0 + word_rows * PER_WORD + j).to(tl.float32)
            codes = _plus_two_pow_23((words >> (j * BITS)) & code_mask)
            step += x[:, None] * (codes - zero[None, :])
        acc += step * scale[None, :]
    total = tl.sum(acc, axis=0)
    if NUM_SPLITS == 1:
        if HAS_BIAS:
            total += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)
    else:
        tl.store(partial_ptr + split * N + cols, total, mask=col_ok)
        if LAST_ADDS:
            tl.debug_barrier()  # every thread's partial sums are written ...
            arrived = tl.atomic_add(counters_ptr + pid_n, 1, sem="acq_rel")  # ... and seen
            if arrived == NUM_SPLITS - 1:
                total = tl.zeros([BLOCK_N], dtype=tl.float32)
                for other in range(NUM_SPLITS):  # in split order: the same sum every run
                    total += tl.load(partial_ptr + other * N + cols, mask=col_ok, other=0.0,
                                     cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
                tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)
                tl.atomic_xchg(counters_ptr + pid_n, 0)  # ready for the next call


@triton.jit
def _dequantize_kernel(qweight_ptr, scales_ptr, qzeros_ptr, w_ptr, N,
                       BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                       ZERO_OFFSET: tl.constexpr):
    """Program (word row r, n): the PER_WORD rows of W held in word row r, columns of
    tile n, written out dequantized in w's dtype (for large M: then a dense matmul)."""
    PER_WORD: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    r, pid_n = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    words = tl.load(qweight_ptr + r * N + cols, mask=col_ok, other=0)
    group = (r * PER_WORD) // GROUP_SIZE
    scale = tl.load(scales_ptr + group * N + cols, mask=col_ok, other=0.0)
    zero = _biased_zeros(qzeros_ptr, group, cols, col_ok, N, BITS, ZERO_OFFSET)
    for j in tl.static_range(PER_WORD):  # q - z exact in fp32, times the scale in its dtype
        w = (_plus_two_pow_23((words >> (j * BITS)) & MASK) - zero).to(scale.dtype) * scale
        tl.store(w_ptr + (r * PER_WORD + j) * N + cols, w.to(w_ptr.dtype.element_ty),
                 mask=col_ok)


# -- choosing a launch ----------------------------------------------------------------
@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the tensor's GPU (a small pretend count on the CPU)."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def default_config(m: int, path: str | None = None) -> dict:
    """The path for M rows (or the one named) and its launch settings (a copy: callers
    may change it)."""
    if path is None:
        path = ("gemv" if m == 1 else "decode" if m <= DECODE_MAX_M
                else "prefill" if m < DEQUANT_MIN_M  # none while DEQUANT_MIN_M is 17
                else "dequant")
    table = INTERPRETER_CONFIGS if INTERPRETED else GPU_CONFIGS
    return {"path": path, **table[path]}


def fitting_block_k(block_k: int, group_size: int, k: int) -> int:
    """The largest power of two <= block_k that divides K and either divides group_size
    (a K-step inside one group) or is a multiple of it (whole groups per K-step).
    group_size is a multiple of 16, so this is at least 16."""
    while k % block_k or (group_size % block_k and block_k % group_size):
        block_k //= 2
    return block_k


def split_k(output_tiles: int, k_steps: int, fill: int, sms: int) -> tuple[int, int]:
    """(splits, K-steps per split): cut K so that the grid has about `fill` programs per
    multiprocessor (fill 0: never cut), with no split left empty."""
    if fill <= 0 or output_tiles >= fill * sms:
        return 1, k_steps
    splits = min(k_steps, triton.cdiv(fill * sms, output_tiles))
    steps = triton.cdiv(k_steps, splits)
    return triton.cdiv(k_steps, steps), steps


def launch_plan(m: int, n: int, k: int, group_size: int, sms: int, bits: int = 4,
                **config) -> dict:
    """Everything a call launches for an [m, k] x [k, n] matmul: the settings of
    `default_config(m)` updated with `config`, BLOCK_K fitted to the group, the grid and
    the split of K. A function of the shapes only (CUDA graphs need that).

    On the tensor-core paths, with fill > 0, a matmul too small to give `fill` programs
    per multiprocessor even with every K-step its own split (at M = 2, N = 128, K = 896:
    4 x 7 tiles of 32 columns and 128 rows of K) first gets narrower column tiles (down
    to 16), then K is split."""
    plan = default_config(m, config.get("path")) | config
    if plan["path"] == "dequant":
        plan.update(grid=(k * bits // 32, triton.cdiv(n, plan["block_n"])), splits=1)
        return plan
    if plan["path"] == "gemv":  # one row; a K-step inside one group, whole words
        if m != 1:
            raise ValueError(f"gptq_matmul: the gemv path takes one row, not {m}")
        plan["block_m"] = 1
        block_k = plan["block_k"] = max(32 // bits, fitting_block_k(
            min(plan["block_k"], group_size), group_size, k))
        tiles_n, k_steps = triton.cdiv(n, plan["block_n"]), k // block_k
        if tiles_n > MAX_COLUMN_TILES:
            raise ValueError(f"gptq_matmul: {tiles_n} column tiles of {plan['block_n']} "
                             f"exceed the gemv path's {MAX_COLUMN_TILES} split counters")
        splits, steps = split_k(tiles_n, k_steps, plan["fill"], sms)
        plan.update(grid=(tiles_n, splits), splits=splits, k_per_split=steps * block_k)
        return plan
    block_k = plan["block_k"] = fitting_block_k(plan["block_k"], group_size, k)
    target, k_steps = plan["fill"] * sms, k // block_k
    tiles_m = triton.cdiv(m, plan["block_m"])
    while (plan["fill"] > 0 and plan["block_n"] > MIN_BLOCK
           and tiles_m * triton.cdiv(n, plan["block_n"]) * k_steps < target):
        plan["block_n"] //= 2
    tiles_n = triton.cdiv(n, plan["block_n"])
    splits, steps = split_k(tiles_n * tiles_m, k_steps, plan["fill"], sms)
    plan.update(grid=(tiles_n, tiles_m, splits), splits=splits, k_per_split=steps * block_k)
    return plan


@functools.lru_cache(maxsize=4096)
def _cached_plan(m: int, n: int, k: int, group_size: int, sms: int, bits: int,
                 overrides: tuple) -> dict:
    """`launch_plan`, worked out once per shape (a decode step asks the same few)."""
    return launch_plan(m, n, k, group_size, sms, bits, **dict(overrides))


_SPLIT_COUNTERS: dict[torch.device, torch.Tensor] = {}
MAX_COLUMN_TILES = 8192  # per call of the gemv path that splits K


def split_counters(device: torch.device) -> torch.Tensor:
    """The gemv path's arrival counters (one per column tile, zero between calls: the
    last program of a tile resets its own), made once per device. `GPTQLinear.prepare`
    makes them at load, so a CUDA graph capture never allocates them."""
    if device not in _SPLIT_COUNTERS:
        _SPLIT_COUNTERS[device] = torch.zeros(MAX_COLUMN_TILES, dtype=torch.int32,
                                              device=device)
    return _SPLIT_COUNTERS[device]


# -- the entry points -----------------------------------------------------------------
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check(x, qweight, scales, qzeros, group_size, bits, bias) -> None:
    """A few comparisons (this runs for every layer of every step): a clear error for a
    call the kernel would get wrong, rather than wrong numbers."""
    if bits not in (4, 8):
        raise ValueError(f"gptq_matmul: bits must be 4 or 8, got {bits!r}")
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype not in DTYPES:
        raise ValueError(f"gptq_matmul: x must be 2-D, bf16/fp16/fp32, with contiguous "
                         f"rows; got {x.dtype} {tuple(x.shape)} strides {x.stride()}")
    per_word = 32 // bits
    k, n = x.shape[1], qweight.shape[-1]
    groups = scales.shape[0] if scales.dim() == 2 else -1
    if (qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[0] * per_word != k
            or n % per_word or not qweight.is_contiguous()):
        raise ValueError(f"gptq_matmul: qweight must be contiguous int32 [{k} * {bits} / 32, "
                         f"N], N a multiple of {per_word}; got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    if scales.shape != (groups, n) or scales.dtype != x.dtype or not scales.is_contiguous():
        raise ValueError(f"gptq_matmul: scales must be contiguous [groups, {n}] in x's dtype "
                         f"{x.dtype}; got {scales.dtype} {tuple(scales.shape)}")
    if (qzeros.shape != (groups, n // per_word) or qzeros.dtype != torch.int32
            or not qzeros.is_contiguous()):
        raise ValueError(f"gptq_matmul: qzeros must be contiguous int32 [{groups}, {n} * "
                         f"{bits} / 32]; got {qzeros.dtype} {tuple(qzeros.shape)}")
    if group_size % MIN_BLOCK or groups * group_size != k:
        raise ValueError(f"gptq_matmul: group_size {group_size} must be a multiple of "
                         f"{MIN_BLOCK} and cut K = {k} into the {groups} groups of scales")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"gptq_matmul: bias must be [{n}] in x's dtype {x.dtype}; got "
                         f"{bias.dtype} {tuple(bias.shape)}")


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                qzeros: torch.Tensor, group_size: int, bits: int,
                bias: torch.Tensor | None = None, zero_offset: int = 1,
                **config) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32, contiguous rows) @ the GPTQ weight [K, N] -> [M, N] in
    x's dtype. qweight: int32 [K * bits / 32, N]; scales: [K / group_size, N] in x's
    dtype; qzeros: int32 [K / group_size, N * bits / 32], zero points minus
    `zero_offset` (1: format v1; 0: v2); bias: None or [N], added in the kernel's last
    step (one launch less than `y + bias`).
    `config` overrides the path's launch settings (block_m, block_n, block_k, num_warps,
    num_stages, fill, words_once; see `launch_plan`), for tests and tuning."""
    _check(x, qweight, scales, qzeros, group_size, bits, bias)
    (m, k), n = x.shape, qweight.shape[1]
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    plan = _cached_plan(m, n, k, group_size, num_sms(x.device), bits, tuple(config.items()))
    if plan["path"] == "dequant":
        weight = dequantize_weight(qweight, scales, qzeros, group_size, bits, plan,
                                   zero_offset)
        return torch.matmul(x, weight) if bias is None else torch.addmm(bias, x, weight)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    splits = plan["splits"]
    partial = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32,
                                                  device=x.device)
    if plan["path"] == "gemv":
        last_adds = plan["last_adds"] and splits > 1
        _gptq_gemv_kernel[plan["grid"]](
            x, qweight, scales, qzeros, x if bias is None else bias, out, partial,
            split_counters(x.device) if last_adds else partial, n, k, plan["k_per_split"],
            (1 << bits) - 1, HAS_BIAS=bias is not None and (splits == 1 or last_adds),
            BITS=bits, GROUP_SIZE=group_size, BLOCK_N=plan["block_n"],
            WORD_ROWS=plan["block_k"] * bits // 32, NUM_SPLITS=splits, LAST_ADDS=last_adds,
            ZERO_OFFSET=zero_offset, num_warps=plan["num_warps"],
            num_stages=plan["num_stages"])
        if last_adds:
            return out
    else:
        _gptq_gemm_kernel[plan["grid"]](
            x, qweight, scales, qzeros, x if bias is None else bias, partial, m, n, k,
            plan["k_per_split"], x.stride(0), m * n,
            HAS_BIAS=bias is not None and splits == 1, BITS=bits, GROUP_SIZE=group_size,
            BLOCK_M=plan["block_m"],
            BLOCK_N=plan["block_n"], BLOCK_K=plan["block_k"], WORDS_ONCE=plan["words_once"],
            PRECISION=precision_of(x.dtype), ZERO_OFFSET=zero_offset,
            num_warps=plan["num_warps"], num_stages=plan["num_stages"])
    if splits > 1:
        _sum_splits_kernel[(triton.cdiv(m * n, SUM_BLOCK),)](
            partial, x if bias is None else bias, out, m * n, n, splits,
            HAS_BIAS=bias is not None, BLOCK=SUM_BLOCK)
    return out


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                      group_size: int, bits: int, plan: dict | None = None,
                      zero_offset: int = 1) -> torch.Tensor:
    """The weight [K, N] written out in the scales' dtype, by a kernel."""
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    plan = plan or launch_plan(k, n, k, group_size, num_sms(qweight.device), bits,
                               path="dequant")
    w = torch.empty((k, n), dtype=scales.dtype, device=qweight.device)
    _dequantize_kernel[plan["grid"]](qweight, scales, qzeros, w, n, BITS=bits,
                                     GROUP_SIZE=group_size, BLOCK_N=plan["block_n"],
                                     ZERO_OFFSET=zero_offset, num_warps=plan["num_warps"])
    return w


def gptq_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    qzeros: torch.Tensor, group_size: int, bits: int,
                    bias: torch.Tensor | None = None, zero_offset: int = 1) -> torch.Tensor:
    """The same in plain torch: unpack the codes and zero points (+ zero_offset),
    dequantize W [K, N] in fp32, x @ W (+ bias) in fp32, rounded to x's dtype."""
    groups = torch.arange(qweight.shape[0] * 32 // bits, device=qweight.device) // group_size
    weight = dequantize(qweight, qzeros, scales.float(), groups, bits, zero_offset)
    y = x.float() @ weight
    return (y if bias is None else y + bias.float()).to(x.dtype)
