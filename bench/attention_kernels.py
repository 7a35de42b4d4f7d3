"""M4's attention kernels against the hardware and against torch: `python3 bench/attention_kernels.py`.

Introduced with M4. On a CUDA GPU, in bf16, on the attention shapes of two models
(qwen2.5-0.5b: 14 query heads, 2 kv heads, head_dim 64; qwen3-0.6b: 16 / 8 / 128), with
a paged cache of 16-token blocks whose blocks lie shuffled in the pool, it measures:

- copy bandwidth: a 1 GiB device-to-device copy (bench/roofline.py's `measure`), bytes
  read + written per second; and read bandwidth: a Triton kernel that only reads 1 GiB
  (`read_bandwidth`). A decode kernel only reads, and HBM serves reads alone faster than
  a copy's mix of reads and writes, so a decode row can pass 100% of the copy bandwidth
  (not an L2 effect: the L2 is emptied and the largest caches are GiBs); its share of
  the read bandwidth is the bound it cannot pass;
- the paged decode kernel (`paged_decode_attention`, split-K with `decode_num_splits`)
  at batch 1, 16, 64, 256 x context 512, 1024, 4096: time, KV bytes read per second
  (sum over sequences of seq_len x kv_heads x head_dim x 2 (K and V) x 2 bytes) and that
  as a fraction of the copy bandwidth (M4's goal: >= 60% at batch 64, context >= 1024);
  beside it M3's reference path on the same shapes (gather the keys through the block
  table + `scaled_dot_product_attention`, `m3_paged_kv.attention.backends.torch_ref`),
  its per-step metadata build timed apart;
- the varlen (prefill) kernel (`paged_attention`) on batches of causal prompts (1x2048,
  4x512, 8x1024, 1x4096), the cache holding their keys: TFLOP/s with causal FLOPs
  sum_i 4 * heads * head_dim * L_i (L_i + 1) / 2, beside torch's flash SDPA
  (`sdpa_kernel(SDPBackend.FLASH_ATTENTION)`, is_causal) on the same q/k/v laid out
  [B, H, L, d]; the ratio is ours over torch's (goal >= 0.7).

The L2 cache is emptied before every timed call, so the KV bytes really come from HBM.
Our kernels and torch's SDPA are timed in a CUDA graph (`reps` calls, each after a
256 MiB memset, less the memsets' own time; no Python launch cost, as in M4's
CUDA-graph decode); M3's path, which runs eagerly, with `triton.testing.do_bench`
(median). Each row's `timing` says which was used. Every timed kernel's output is
checked once per shape against an fp32 reference (`paged_attention_ref`, on the CPU)
from the same inputs; a row whose error is over the tolerance is marked WRONG in the
table and in the JSON (`ok`: false) and the command exits 1.

    python3 bench/attention_kernels.py                     # the full set, ~35 s on an H100
    python3 bench/attention_kernels.py --quick --out k.json
    python3 bench/attention_kernels.py --interpret-smoke   # CPU: tiny shapes, Triton interpreter

Without CUDA it refuses (exit code 2), unless `--interpret-smoke`: tiny fp32 shapes on
the CPU under TRITON_INTERPRET=1, to check that the script itself works; its timings
mean nothing and the JSON says so (`timings_meaningful`: false).

The JSON (default bench/scratch/kernels-<device>-<date>.json) holds the provenance of
bench/compare.py's files (command, git_commit, git_dirty, date, machine with the SM
count, versions with CUDA), copy_bandwidth_gbps, matmul_tflops, goals, and rows (kind
"decode" or "prefill").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the stages and `bench` importable
    sys.path.insert(0, str(REPO))

from bench.compare import scratch_dir  # noqa: E402
from bench.provenance import format_table, provenance  # noqa: E402

PROG = "python3 bench/attention_kernels.py"
BLOCK_SIZE = 16
# name -> (query heads, kv heads, head_dim), from the models' public config.json files
MODELS = {"qwen2.5-0.5b": (14, 2, 64), "qwen3-0.6b": (16, 8, 128)}
DECODE_BATCHES, DECODE_CONTEXTS = (1, 16, 64, 256), (512, 1024, 4096)
PREFILL_SETS = ((1, 2048), (4, 512), (8, 1024), (1, 4096))  # (prompts, tokens each)
QUICK = dict(batches=(1, 64, 256), contexts=(1024, 4096), prefill=((4, 512), (1, 4096)))
# --interpret-smoke: the Triton interpreter on the CPU, in fp32 (its bf16 dot is wrong)
SMOKE_MODELS = {"tiny": (4, 2, 16)}
SMOKE = dict(batches=(1, 3), contexts=(17, 40), prefill=((1, 20), (2, 9)))
SMOKE_SMS = 2  # a pretend SM count: few splits, so the interpreter is quick
MAX_CACHE_BYTES = 20 * 2 ** 30  # decode shapes whose K+V cache is larger are skipped
TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-3}  # max abs error vs the fp32 reference
DECODE_GOAL, PREFILL_GOAL = 0.6, 0.7


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0].split(": ")[0] + ": copy "
        "bandwidth, the paged decode kernel (GB/s and fraction of copy bandwidth, next to "
        "M3's gather + SDPA) and the varlen prefill kernel (TFLOP/s, next to torch's flash "
        "SDPA), bf16, on qwen2.5-0.5b and qwen3-0.6b attention shapes; a table and a JSON.",
        epilog="Needs a CUDA GPU (exit code 2 without one) unless --interpret-smoke. Each "
               "kernel's output is checked against an fp32 reference; a wrong one is marked "
               "WRONG and the exit code is 1.")
    p.add_argument("--out", metavar="FILE.json",
                   help="where the JSON goes (default bench/scratch/kernels-<device>-<date>.json)")
    p.add_argument("--quick", action="store_true",
                   help="fewer shapes (decode batch 1,64,256 x context 1024,4096; prefill "
                        "4x512, 1x4096) and shorter timing loops")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated, from {', '.join(MODELS)} (default: both)")
    p.add_argument("--parts", default="decode,prefill",
                   help="comma-separated: decode, prefill (default: both)")
    p.add_argument("--no-m3", action="store_true",
                   help="skip M3's reference path (gather + SDPA) beside the decode kernel")
    p.add_argument("--m3-max-gib", type=float, default=12.0,
                   help="skip M3's path where its gathered K and V would exceed this many "
                        "GiB (default 12)")
    p.add_argument("--interpret-smoke", action="store_true",
                   help="run tiny fp32 shapes on the CPU under the Triton interpreter, to "
                        "check the script works; timings are meaningless (and labelled so)")
    return p


# -- inputs ---------------------------------------------------------------------------
def paged_cache(seq_lens: list[int], kv_heads: int, head_dim: int, block_size: int,
                dtype, device, seed: int = 0):
    """Random K and V caches `[num_blocks, block_size, kv_heads, head_dim]` holding the
    sequences' keys, each sequence's blocks drawn from a shuffled pool (a few spare
    blocks too), and the block tables `[B, max_blocks]` (int32, 0-padded)."""
    import torch

    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + 4
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    tables = torch.zeros(len(seq_lens), max(needed + [1]), dtype=torch.int32)
    used = 0
    for i, n in enumerate(needed):
        tables[i, :n] = order[used:used + n]
        used += n
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    return k_cache, v_cache, tables.to(device)


def gather_keys(cache, tables, seq_len: int, block_size: int):
    """One sequence's keys (or values) in order, [B, kv_heads, L, d], for torch's SDPA."""
    import torch

    pos = torch.arange(seq_len, device=cache.device)
    return cache[tables[:, pos // block_size].long(), pos % block_size].permute(0, 2, 1, 3)


# -- timing ---------------------------------------------------------------------------
class Timer:
    """Milliseconds per call of `fn` on the GPU, with the L2 cache emptied before every
    call (so a kernel's bytes come from HBM, not from the 50 MB L2).

    `graph_ms`: `reps` calls, each after a 256 MiB memset, captured in one CUDA graph;
    the time of that graph less the time of one with the memsets alone, per call (median
    of several rounds). No host launch cost is in it: the number is the kernel's, as a
    CUDA-graph decode step replays it. `eager_ms`: `triton.testing.do_bench` (median),
    each call launched from Python, for a path that runs eagerly (M3's); its launches are
    mostly hidden behind the memset before each call, but a call whose host time is
    longer than its GPU time is measured at its host time. Either falls back to the other
    (graph to eager) if capture fails; `last_method` says which ran. Under the
    interpreter: the wall time of one call (meaningless, only to fill the rows)."""

    FLUSH_BYTES = 256 * 2 ** 20

    def __init__(self, device: str, quick: bool) -> None:
        self.device = device
        self.warmup, self.rep = (10, 40) if quick else (25, 100)
        self.reps, self.rounds = (10, 5) if quick else (20, 9)
        self.last_method = None

    def _wall_ms(self, fn) -> float:
        self.last_method = "wall time of one call (interpreter)"
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def eager_ms(self, fn) -> float:
        if self.device != "cuda":
            return self._wall_ms(fn)
        import triton.testing

        self.last_method = "do_bench"
        return float(triton.testing.do_bench(fn, warmup=self.warmup, rep=self.rep,
                                             return_mode="median"))

    def graph_ms(self, fn) -> float:
        if self.device != "cuda":
            return self._wall_ms(fn)
        import torch

        flush = torch.empty(self.FLUSH_BYTES, dtype=torch.int8, device="cuda")
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up off the capture stream
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            flush_only, both = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(flush_only):
                for _ in range(self.reps):
                    flush.zero_()
            with torch.cuda.graph(both):
                for _ in range(self.reps):
                    flush.zero_()
                    fn()
        except RuntimeError as exc:  # not capturable: time it eagerly
            torch.cuda.synchronize()
            ms = self.eager_ms(fn)
            self.last_method = f"do_bench (CUDA graph capture failed: {str(exc)[:80]})"
            return ms

        def replay(graph) -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        replay(flush_only), replay(both)  # warm
        diffs = [(replay(both) - replay(flush_only)) / self.reps for _ in range(self.rounds)]
        del flush_only, both, flush
        self.last_method = "cuda_graph"
        return max(statistics.median(diffs), 1e-6)

    def host_ms(self, fn, repeats: int = 10) -> float:
        """Wall time of a call that runs on the host and waits for the device (the M3
        metadata build: .tolist() and small copies), synchronized before and after."""
        import torch

        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        fn()
        times = []
        for _ in range(repeats if self.device == "cuda" else 1):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def copy_bandwidth(device: str) -> dict:
    """Copy bandwidth (bytes read + written per second) and the bf16 matmul rate:
    bench/roofline.py's measurement on CUDA; a small timed copy on the CPU (smoke)."""
    if device == "cuda":
        from bench.roofline import measure

        return measure("cuda")
    import torch

    src = torch.ones(1 << 21)  # 8 MiB
    dst = torch.empty_like(src)
    t0 = time.perf_counter()
    dst.copy_(src)
    seconds = max(time.perf_counter() - t0, 1e-9)
    return {"bandwidth_gbps": 2 * src.numel() * 4 / seconds / 1e9, "matmul_tflops": None}


def read_bandwidth(timer: "Timer", device: str) -> float:
    """GB/s of a kernel that reads a 1 GiB buffer once (each program sums its part): the
    most a kernel that only reads can get; a small buffer under the interpreter (smoke)."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def read_all(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        start = tl.program_id(0) * BLOCK * ITERS
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))

    block, iters = (4096, 16) if device == "cuda" else (64, 2)
    n = 2 ** 29 if device == "cuda" else 4096  # 1 GiB of bf16 (smoke: 16 KiB of fp32)
    x = torch.ones(n, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                   device=device)
    programs = triton.cdiv(n, block * iters)
    out = torch.empty(programs, dtype=torch.float32, device=device)

    def kernel():
        read_all[(programs,)](x, out, n, BLOCK=block, ITERS=iters, num_warps=8)

    kernel()
    if float(out.sum()) != n:
        raise RuntimeError("read_bandwidth: the read kernel summed the buffer wrongly")
    ms = timer.graph_ms(kernel)
    return n * x.element_size() / ms / 1e6


def reference(q, k_cache, v_cache, starts, seq_lens, tables, scale: float):
    """`paged_attention_ref` in fp32 from the same inputs, on the CPU (it indexes its
    inputs with CPU tensors, so it runs there): [T, heads, d], float32, on the CPU."""
    from m4_flash_attn.ops import paged_attention as ops

    return ops.paged_attention_ref(q.float().cpu(), k_cache.cpu(), v_cache.cpu(),
                                   starts.cpu(), seq_lens.cpu(), tables.cpu(), scale)


def max_err(got, want) -> float:
    return float((got.float().cpu() - want.float().cpu()).abs().max())


def check(row: dict, key: str, err: float, tol: float) -> None:
    """Record an output's error; one over the tolerance makes the row not ok."""
    row[f"{key}max_abs_err"] = err
    ok = math.isfinite(err) and err < tol
    row[f"{key}ok"] = ok
    if not ok:
        row["ok"] = False
        row.setdefault("problems", []).append(f"{key or 'kernel '}max abs err {err:.3g} "
                                              f">= {tol}")


# -- decode ---------------------------------------------------------------------------
def decode_row(model: str, shape, batch: int, context: int, ctx: dict) -> dict:
    import torch

    from m4_flash_attn.ops import paged_attention as ops

    heads, kv_heads, head_dim = shape
    dtype, device, timer = ctx["dtype"], ctx["device"], ctx["timer"]
    kv_bytes = batch * context * kv_heads * head_dim * 2 * ctx["itemsize"]
    row = {"kind": "decode", "model": model, "heads": heads, "kv_heads": kv_heads,
           "head_dim": head_dim, "block_size": BLOCK_SIZE, "batch": batch,
           "context": context, "kv_bytes": kv_bytes, "ok": True}
    if kv_bytes > MAX_CACHE_BYTES:
        row.update(skipped=f"the cache ({kv_bytes / 2 ** 30:.1f} GiB) is over "
                           f"{MAX_CACHE_BYTES / 2 ** 30:.0f} GiB")
        return row
    seq_lens_list = [context] * batch
    k_cache, v_cache, tables = paged_cache(seq_lens_list, kv_heads, head_dim, BLOCK_SIZE,
                                           dtype, device, seed=batch * 7 + context)
    q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
    seq_lens = torch.tensor(seq_lens_list, dtype=torch.int32, device=device)
    starts = torch.arange(batch + 1, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    splits = ops.decode_num_splits(batch, kv_heads, num_sms=ctx["num_sms"])
    row["num_splits"] = splits

    def kernel():
        return ops.paged_decode_attention(q, k_cache, v_cache, starts, seq_lens, tables,
                                          scale, splits)

    want = reference(q, k_cache, v_cache, starts, seq_lens, tables, scale)
    check(row, "", max_err(kernel(), want), ctx["tol"])
    ms = timer.graph_ms(kernel)
    row["timing"] = timer.last_method
    row.update(kernel_us=ms * 1e3, gbps=kv_bytes / ms / 1e6,
               copy_fraction=kv_bytes / ms / 1e6 / ctx["copy_gbps"],
               read_fraction=kv_bytes / ms / 1e6 / ctx["read_gbps"])
    if ctx["m3"] and 2 * kv_bytes <= ctx["m3_max_bytes"]:
        m3_reference(row, q, k_cache, v_cache, starts, seq_lens, tables, want, ctx)
    elif ctx["m3"]:
        row["m3_skipped"] = f"its gathered K and V would be {2 * kv_bytes / 2 ** 30:.1f} GiB"
    return row


def m3_reference(row: dict, q, k_cache, v_cache, starts, seq_lens, tables, want,
                 ctx: dict) -> None:
    """M3's decode path on the same inputs: its metadata (built once per step from the
    block tables) timed apart from its attention (gather every key + SDPA)."""
    from m3_paged_kv.attention.backends import torch_ref
    from m3_paged_kv.attention.metadata import AttentionMetadata

    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    md = AttentionMetadata(query_start_loc=starts.long(), seq_lens=seq_lens.long(),
                           block_tables=tables.long(), slot_mapping=starts[:-1].long(),
                           max_query_len=1, max_seq_len=int(seq_lens.max()))

    def metadata():
        return torch_ref.build_metadata(md, BLOCK_SIZE, heads // kv_heads)

    attention = torch_ref.TorchRefAttention(heads, kv_heads, head_dim, head_dim ** -0.5)
    built = metadata()
    got = attention.forward(q, k_cache, v_cache, built).view(batch, heads, head_dim)
    check(row, "m3_", max_err(got, want), ctx["tol"])
    row["m3_metadata_us"] = ctx["timer"].host_ms(metadata) * 1e3
    row["m3_us"] = ctx["timer"].eager_ms(
        lambda: attention.forward(q, k_cache, v_cache, built)) * 1e3
    row["m3_timing"] = ctx["timer"].last_method
    row["m3_speedup"] = row["m3_us"] / row["kernel_us"]


# -- prefill --------------------------------------------------------------------------
def causal_flops(lens: list[int], heads: int, head_dim: int) -> int:
    """QK^T and PV over the visible (causal) pairs: 2 matmuls x 2 FLOPs per multiply-add."""
    return sum(4 * heads * head_dim * n * (n + 1) // 2 for n in lens)


def sdpa_call(q, k, v, scale: float, device: str):
    """torch's SDPA on [B, H, L, d] q and [B, kv_heads, L, d] k, v, causal: the flash
    backend on CUDA. GQA through `enable_gqa` when this torch's flash kernel takes it,
    else k and v repeated per query head here, outside the timed call. Returns (the
    call, how GQA was done)."""
    import torch.nn.functional as F

    group = q.shape[1] // k.shape[1]
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash(**kw):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale,
                                                      **kw)
    else:  # smoke: whatever SDPA the CPU has

        def flash(**kw):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale, **kw)
    if group == 1:
        kk, vv = k, v
        flash()
        return flash, "none (MHA)"
    try:
        kk, vv = k, v
        flash(enable_gqa=True)
        return (lambda: flash(enable_gqa=True)), "enable_gqa"
    except (TypeError, RuntimeError):
        kk = k.repeat_interleave(group, dim=1).contiguous()
        vv = v.repeat_interleave(group, dim=1).contiguous()
        flash()
        return flash, "repeat_interleave (outside the timed call)"


def prefill_row(model: str, shape, num_prompts: int, length: int, ctx: dict) -> dict:
    import torch

    from m4_flash_attn.ops import paged_attention as ops

    heads, kv_heads, head_dim = shape
    dtype, device, timer = ctx["dtype"], ctx["device"], ctx["timer"]
    lens = [length] * num_prompts
    flops = causal_flops(lens, heads, head_dim)
    row = {"kind": "prefill", "model": model, "heads": heads, "kv_heads": kv_heads,
           "head_dim": head_dim, "block_size": BLOCK_SIZE, "prompts": num_prompts,
           "prompt_len": length, "tokens": sum(lens), "flops": flops, "ok": True}
    k_cache, v_cache, tables = paged_cache(lens, kv_heads, head_dim, BLOCK_SIZE, dtype,
                                           device, seed=num_prompts * 13 + length)
    q = torch.randn(sum(lens), heads, head_dim, device=device, dtype=dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    starts = torch.tensor([0] + [length * (i + 1) for i in range(num_prompts)],
                          dtype=torch.int32, device=device)
    scale = head_dim ** -0.5

    def kernel():
        return ops.paged_attention(q, k_cache, v_cache, starts, seq_lens, tables, scale)

    want = reference(q, k_cache, v_cache, starts, seq_lens, tables, scale)
    check(row, "", max_err(kernel(), want), ctx["tol"])
    ms = timer.graph_ms(kernel)
    row["timing"] = timer.last_method
    row.update(kernel_us=ms * 1e3, tflops=flops / ms / 1e9)

    # torch's SDPA on the same keys, laid out contiguously [B, H, L, d]
    qb = q.view(num_prompts, length, heads, head_dim).transpose(1, 2).contiguous()
    kb = gather_keys(k_cache, tables, length, BLOCK_SIZE).contiguous()
    vb = gather_keys(v_cache, tables, length, BLOCK_SIZE).contiguous()
    try:
        call, how = sdpa_call(qb, kb, vb, scale, device)
    except RuntimeError as exc:  # no flash kernel for this shape or dtype
        row["sdpa_error"] = str(exc).splitlines()[0][:200]
        return row
    row["sdpa_gqa"] = how
    got = call().transpose(1, 2).reshape(-1, heads, head_dim)
    check(row, "sdpa_", max_err(got, want), ctx["tol"])
    sdpa_ms = timer.graph_ms(call)
    row["sdpa_timing"] = timer.last_method
    row.update(sdpa_us=sdpa_ms * 1e3, sdpa_tflops=flops / sdpa_ms / 1e9,
               ratio_vs_sdpa=sdpa_ms / ms)
    return row


# -- the table ------------------------------------------------------------------------
def _f(x, fmt: str):
    return None if x is None else format(x, fmt)


def _status(row: dict) -> str:
    if row.get("skipped"):
        return "skipped"
    if row.get("error"):
        return "ERROR"
    return "ok" if row.get("ok") else "WRONG"


def decode_table(rows: list[dict]) -> str:
    headers = ["model", "batch", "ctx", "splits", "us", "GB/s", "% copy", "% read", "err",
               "m3 us", "m3 md us", "x m3", "check"]
    body = [[r["model"], r["batch"], r["context"], r.get("num_splits"),
             _f(r.get("kernel_us"), ".1f"), _f(r.get("gbps"), ".0f"),
             _f(None if r.get("copy_fraction") is None else 100 * r["copy_fraction"], ".1f"),
             _f(None if r.get("read_fraction") is None else 100 * r["read_fraction"], ".1f"),
             _f(r.get("max_abs_err"), ".1e"), _f(r.get("m3_us"), ".1f"),
             _f(r.get("m3_metadata_us"), ".0f"), _f(r.get("m3_speedup"), ".1f"), _status(r)]
            for r in rows if r["kind"] == "decode"]
    return format_table(headers, body)


def prefill_table(rows: list[dict]) -> str:
    headers = ["model", "prompts", "us", "TFLOP/s", "err", "sdpa us", "sdpa TFLOP/s",
               "ratio", "sdpa err", "check"]
    body = [[r["model"], f"{r['prompts']}x{r['prompt_len']}", _f(r.get("kernel_us"), ".1f"),
             _f(r.get("tflops"), ".1f"), _f(r.get("max_abs_err"), ".1e"),
             _f(r.get("sdpa_us"), ".1f"), _f(r.get("sdpa_tflops"), ".1f"),
             _f(r.get("ratio_vs_sdpa"), ".2f"), _f(r.get("sdpa_max_abs_err"), ".1e"),
             _status(r)]
            for r in rows if r["kind"] == "prefill"]
    return format_table(headers, body)


def goals(rows: list[dict]) -> dict:
    """M4's targets, from the rows that decide them (None where none ran)."""
    dec = [r["copy_fraction"] for r in rows if r["kind"] == "decode" and r["batch"] == 64
           and r["context"] >= 1024 and r.get("copy_fraction") is not None]
    pre = [r["ratio_vs_sdpa"] for r in rows
           if r["kind"] == "prefill" and r.get("ratio_vs_sdpa") is not None]
    return {"decode_copy_fraction": {
                "target": DECODE_GOAL, "rows": "decode, batch 64, context >= 1024",
                "min": min(dec) if dec else None, "met": min(dec) >= DECODE_GOAL if dec else None},
            "prefill_vs_sdpa": {
                "target": PREFILL_GOAL, "rows": "every prefill row",
                "min": min(pre) if pre else None, "met": min(pre) >= PREFILL_GOAL if pre else None}}


# -- main -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit is imported
        # the interpreter evaluates both sides of tl.where: log(0) of an empty split
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")
    import torch

    if not args.interpret_smoke and not torch.cuda.is_available():
        print("error: bench/attention_kernels.py needs a CUDA GPU (torch sees none); "
              "--interpret-smoke checks the script on the CPU instead", file=sys.stderr)
        return 2
    smoke = args.interpret_smoke
    models = SMOKE_MODELS if smoke else MODELS
    chosen = list(models) if smoke else [m.strip() for m in args.models.split(",") if m.strip()]
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = [m for m in chosen if m not in models] + sorted(parts - {"decode", "prefill"})
    if unknown:
        print(f"error: unknown --models/--parts entries: {', '.join(unknown)}", file=sys.stderr)
        return 2
    plan = SMOKE if smoke else QUICK if args.quick else dict(
        batches=DECODE_BATCHES, contexts=DECODE_CONTEXTS, prefill=PREFILL_SETS)
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    dtype_name = str(dtype).removeprefix("torch.")
    results = provenance(PROG, argv, device)
    began = time.perf_counter()
    bw = copy_bandwidth(device)
    num_sms = SMOKE_SMS if smoke else results["machine"]["sm_count"]
    timer = Timer(device, args.quick or smoke)
    read_gbps = read_bandwidth(timer, device)
    ctx = {"device": device, "dtype": dtype, "itemsize": dtype.itemsize,
           "timer": timer, "num_sms": num_sms,
           "tol": TOLERANCE[dtype_name], "copy_gbps": bw["bandwidth_gbps"],
           "read_gbps": read_gbps,
           "m3": not args.no_m3, "m3_max_bytes": args.m3_max_gib * 2 ** 30}
    gpu = results["machine"]["gpu"] or "CPU (Triton interpreter)"
    print(f"{gpu}, {num_sms} SMs; copy bandwidth {bw['bandwidth_gbps']:.0f} GB/s, read "
          f"bandwidth {read_gbps:.0f} GB/s"
          + (f", bf16 matmul {bw['matmul_tflops']:.0f} TFLOP/s" if bw.get("matmul_tflops")
             else "") + f"; {dtype_name}, block_size {BLOCK_SIZE}", flush=True)
    if smoke:
        print("INTERPRET SMOKE: tiny shapes on the CPU under the Triton interpreter; the "
              "timings are meaningless", flush=True)

    rows = []
    jobs = []
    for model in chosen:
        if "decode" in parts:
            jobs += [(decode_row, model, b, c) for b in plan["batches"] for c in plan["contexts"]]
        if "prefill" in parts:
            jobs += [(prefill_row, model, n, n_len) for n, n_len in plan["prefill"]]
    with torch.inference_mode():
        for fn, model, a, b in jobs:
            try:
                row = fn(model, models[model], a, b, ctx)
            except Exception as exc:  # a kernel that fails to compile or launch: a row
                row = {"kind": "decode" if fn is decode_row else "prefill", "model": model,
                       "batch" if fn is decode_row else "prompts": a,
                       "context" if fn is decode_row else "prompt_len": b,
                       "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
                print(f"error: {model} {a} x {b}: {row['error']}", file=sys.stderr, flush=True)
            rows.append(row)
            if device == "cuda":
                torch.cuda.empty_cache()
            print(f"  {row['kind']} {model} {a} x {b}: {_status(row)}"
                  + (f", {row['kernel_us']:.1f} us" if row.get("kernel_us") else ""), flush=True)

    results.update(
        device=device, dtype=dtype_name, interpret_smoke=smoke, timings_meaningful=not smoke,
        timing=("kernels and SDPA: CUDA graph of calls each after a 256 MiB memset, less "
                "the memsets (median of rounds); M3's path: triton.testing.do_bench median; "
                "the L2 is emptied before every call" if not smoke
                else "wall time of 1 call under the Triton interpreter"),
        block_size=BLOCK_SIZE, tolerance=ctx["tol"], copy_bandwidth_gbps=bw["bandwidth_gbps"],
        read_bandwidth_gbps=read_gbps,
        matmul_tflops=bw.get("matmul_tflops"), goals=None if smoke else goals(rows),
        rows=rows,
        seconds=time.perf_counter() - began)
    if any(r["kind"] == "decode" for r in rows):
        print("\ndecode (paged_decode_attention, in a CUDA graph; m3 = M3's gather + SDPA, eager "
              "(do_bench), md = its metadata build)")
        print(decode_table(rows))
    if any(r["kind"] == "prefill" for r in rows):
        print("\nprefill (paged_attention, causal; sdpa = torch's flash SDPA on contiguous "
              "q/k/v; ratio = sdpa us / our us)")
        print(prefill_table(rows))
    for name, goal in (results["goals"] or {}).items():
        if goal["min"] is not None:
            print(f"goal {name}: min {goal['min']:.2f} over {goal['rows']} "
                  f"(target >= {goal['target']}): {'met' if goal['met'] else 'NOT met'}")
    if smoke:
        print("INTERPRET SMOKE: the timings above are meaningless")
    out = Path(args.out) if args.out else scratch_dir() / (
        f"kernels-{device}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {out}")
    bad = [r for r in rows if not r.get("ok") and not r.get("skipped")]
    if bad:
        print(f"error: {len(bad)} row(s) WRONG or failed: see 'problems'/'error' in the JSON",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
