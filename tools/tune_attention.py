"""Sweep the tile sizes of M4's attention kernels on a GPU: what `prefill_config` and the
decode defaults in m4_flash_attn/ops/paged_attention.py were chosen from.

    python3 tools/tune_attention.py [--out FILE.json]

For each candidate (block_m, block_n, num_warps, num_stages) of the varlen kernel and
(block_n, num_warps, num_stages, splits per SM) of the decode kernel, on the attention
shapes of qwen2.5-0.5b and qwen3-0.6b in bf16, it times the kernel as a CUDA graph
(bench/attention_kernels.py's Timer), checks its output once against the reference, and prints
the fastest candidates per shape. Needs CUDA.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.attention_kernels import BLOCK_SIZE, MODELS, Timer, max_err, paged_cache, reference  # noqa: E402
from m4_flash_attn.ops import paged_attention as ops  # noqa: E402

PREFILL_SHAPES = [(4, 512), (1, 4096), (8, 1024)]  # (prompts, length)
PREFILL_CONFIGS = [(bm, bn, w, s) for bm, bn, w in [(64, 64, 4), (128, 64, 8), (128, 64, 4),
                                                     (128, 32, 4), (64, 32, 4), (128, 128, 8)]
                   for s in (1, 2, 3)]
DECODE_SHAPES = [(64, 1024), (64, 4096), (1, 4096), (256, 1024)]  # (batch, context)
DECODE_CONFIGS = [(bn, w, s, f) for bn in (32, 64, 128) for w in (2, 4) for s in (1, 2, 3)
                  for f in (1, 2, 4)]


def prefill(model, shape, prompts, length, timer):
    heads, kv_heads, head_dim = shape
    lens = [length] * prompts
    k_cache, v_cache, tables = paged_cache(lens, kv_heads, head_dim, BLOCK_SIZE,
                                           torch.bfloat16, "cuda")
    q = torch.randn(sum(lens), heads, head_dim, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    starts = torch.arange(0, prompts + 1, dtype=torch.int32, device="cuda") * length
    want = reference(q, k_cache, v_cache, starts, seq_lens, tables, head_dim ** -0.5)
    flops = sum(4 * heads * head_dim * n * (n + 1) // 2 for n in lens)
    rows = []
    for bm, bn, w, s in PREFILL_CONFIGS:
        def kernel():
            return ops.paged_attention(q, k_cache, v_cache, starts, seq_lens, tables,
                                       head_dim ** -0.5, block_m=bm, block_n=bn,
                                       num_warps=w, num_stages=s)
        try:
            err = max_err(kernel(), want)
            ms = timer.graph_ms(kernel)
        except Exception as exc:  # e.g. out of shared memory for this tile
            rows.append(dict(config=[bm, bn, w, s], error=str(exc)[:120]))
            continue
        rows.append(dict(config=[bm, bn, w, s], us=ms * 1e3, tflops=flops / ms / 1e9,
                         err=err))
    return dict(kind="prefill", model=model, prompts=prompts, length=length, rows=rows)


def decode(model, shape, batch, context, timer, num_sms):
    heads, kv_heads, head_dim = shape
    lens = [context] * batch
    k_cache, v_cache, tables = paged_cache(lens, kv_heads, head_dim, BLOCK_SIZE,
                                           torch.bfloat16, "cuda")
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    starts = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    want = reference(q, k_cache, v_cache, starts, seq_lens, tables, head_dim ** -0.5)
    kv_bytes = batch * context * kv_heads * head_dim * 4
    rows = []
    for bn, w, s, f in DECODE_CONFIGS:
        splits = ops.decode_num_splits(batch, kv_heads, num_sms=num_sms * f)

        def kernel():
            return ops.paged_decode_attention(q, k_cache, v_cache, starts, seq_lens, tables,
                                              head_dim ** -0.5, splits, block_n=bn,
                                              num_warps=w, num_stages=s)
        try:
            err = max_err(kernel(), want)
            ms = timer.graph_ms(kernel)
        except Exception as exc:
            rows.append(dict(config=[bn, w, s, f], error=str(exc)[:120]))
            continue
        rows.append(dict(config=[bn, w, s, f], splits=splits, us=ms * 1e3,
                         gbps=kv_bytes / ms / 1e6, err=err))
    return dict(kind="decode", model=model, batch=batch, context=context, rows=rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write every timing here (JSON)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("tune_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    timer = Timer("cuda", quick=True)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for model, shape in MODELS.items():
        for prompts, length in PREFILL_SHAPES:
            results.append(prefill(model, shape, prompts, length, timer))
        for batch, context in DECODE_SHAPES:
            results.append(decode(model, shape, batch, context, timer, num_sms))
    for r in results:
        ok = sorted((x for x in r["rows"] if "us" in x and x["err"] < 3e-2),
                    key=lambda x: x["us"])
        what = (f"{r['prompts']}x{r['length']}" if r["kind"] == "prefill"
                else f"batch {r['batch']} ctx {r['context']}")
        best = ", ".join(f"{x['config']} {x['us']:.1f}us" for x in ok[:4])
        print(f"{r['kind']:8} {r['model']:13} {what:18} best: {best}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
