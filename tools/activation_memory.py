"""How much memory one long prompt's forward passes take: `python3 tools/activation_memory.py`.

A lead's tool (M5). For each stage it builds an `LLM` with a KV cache sized for the
prompt (`kv_cache_memory`, so no memory profiling pass runs), generates one token for a
short prompt (warm-up: kernels compiled, CUDA graphs captured), then generates one token
for a prompt of `--prompt-len` random tokens and records the peak of
`torch.cuda.max_memory_allocated` above what was allocated just before (weights, KV
cache, graph pool). That peak is the activations of the prompt's forward passes and the
sampler: without chunked prefill the whole prompt is one step, so it grows with the
prompt; with chunked prefill (M5) no step holds more than `max_num_batched_tokens`
tokens, so it stays bounded by the chunk.

Each stage runs eager (`enforce_eager=True`), so that every step's activations are new
allocations and show in the peak; with `--graphs` it also runs a row with CUDA graphs,
whose steps of up to the largest captured size use the graph pool allocated at start
(`graph_pool_mib`), and only larger steps allocate more.

    python3 tools/activation_memory.py --stages m4,m5 --model dummy:qwen3-0.6b \\
        --prompt-len 16384 --out bench/results/activation-memory-....json   # ~1 min, H100
    python3 tools/activation_memory.py --device cpu --stages m5 --model dummy:tiny-llama \\
        --prompt-len 300                       # CPU smoke: no peak, the run only

The JSON holds bench/compare.py's provenance (command, git commit, machine, versions)
and one row per (stage, graphs or eager) with the peak in MiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import stages as registry  # noqa: E402
from bench.compare import model_slug, scratch_dir  # noqa: E402
from bench.provenance import format_table, provenance  # noqa: E402

PROG = "python3 tools/activation_memory.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Peak memory of one long prompt's forward passes, per stage: with "
                    "chunked prefill (M5) it is bounded by the token budget, without it "
                    "it grows with the prompt.")
    p.add_argument("--stages", default="m4,m5", help="comma-separated stages (default m4,m5)")
    p.add_argument("--model", default="dummy:qwen3-0.6b",
                   help="dummy:NAME, 'default' or a local HF folder (default dummy:qwen3-0.6b)")
    p.add_argument("--prompt-len", type=int, default=16384,
                   help="tokens in the long prompt (default 16384)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default); cpu runs the same steps without a peak (smoke)")
    p.add_argument("--graphs", action="store_true",
                   help="also a row per stage with CUDA graphs (enforce_eager=False)")
    p.add_argument("--out", metavar="FILE.json",
                   help="where the JSON goes (default bench/scratch/activation-memory-"
                        "<model>-<device>-<date>.json)")
    return p


def kv_bytes_for(mc, num_tokens: int, itemsize: int) -> int:
    """A KV cache of num_tokens tokens and 10% to spare."""
    per_token = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * itemsize
    return int(1.1 * num_tokens * per_token) + 2**20


def measure(package: str, eager: bool, args, mc) -> dict:
    """Build the stage, warm it up, generate one token of the long prompt; the peak."""
    import torch

    stage = importlib.import_module(package)
    fields = {f.name for f in dataclasses.fields(stage.EngineConfig)}
    cuda = args.device == "cuda"
    row = {"row": package + (":eager" if eager else ":graphs"), "stage": package,
           "enforce_eager": eager, "prompt_len": args.prompt_len}
    kwargs = {"device": args.device, "max_model_len": args.prompt_len + 16,
              "kv_cache_memory": kv_bytes_for(mc, args.prompt_len + 64, 2 if cuda else 4)}
    if "enforce_eager" in fields:
        kwargs["enforce_eager"] = eager
    elif not eager:
        return {**row, "error": f"{package} has no CUDA graphs"}
    llm = stage.LLM(args.model, **kwargs)
    try:
        config = llm.config
        row["max_num_batched_tokens"] = config.max_num_batched_tokens
        row["enable_chunked_prefill"] = getattr(config, "enable_chunked_prefill", False)
        graphs = getattr(llm.engine.model_runner, "graphs", None)
        row["graph_pool_mib"] = graphs.memory_bytes / 2**20 if graphs is not None else 0.0
        params = stage.SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        llm.generate([[5] * 32], params, use_tqdm=False)  # warm-up
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, min(mc.vocab_size, 5000), (args.prompt_len,),
                               generator=gen).tolist()
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        if cuda:
            torch.cuda.synchronize()
            row["peak_activation_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
            row["allocated_before_mib"] = before / 2**20
        row["seconds"] = time.perf_counter() - began
        row["output_tokens"] = len(out.token_ids)
    finally:
        del llm
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        packages = [registry.get(name.strip()).package
                    for name in args.stages.split(",") if name.strip()]
    except KeyError as exc:
        print(f"error: --stages: unknown stage {exc}", file=sys.stderr)
        return 2
    if not packages or args.prompt_len < 1:
        print("error: give --stages and a --prompt-len >= 1", file=sys.stderr)
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no GPU", file=sys.stderr)
        return 2
    loader = importlib.import_module(f"{packages[0]}.model_executor.model_loader")
    mc = loader.load_model_config(args.model)
    results = provenance(PROG, argv, args.device)
    rows = []
    for package in packages:
        for eager in ([True, False] if args.graphs else [True]):
            print(f"measuring {package} ({'eager' if eager else 'graphs'}) ...", flush=True)
            try:
                rows.append(measure(package, eager, args, mc))
            except Exception as exc:  # a row that fails is a row, not the end of the run
                rows.append({"row": package, "error": f"{type(exc).__name__}: {exc}"[:500]})
    results.update(model=args.model, device=args.device, prompt_len=args.prompt_len,
                   rows=rows)
    headers = ["row", "budget", "chunked", "peak MiB", "graph pool MiB", "seconds"]
    table = [[r["row"], r.get("max_num_batched_tokens", "-"),
              r.get("enable_chunked_prefill", "-"),
              f"{r['peak_activation_mib']:.0f}" if "peak_activation_mib" in r else "-",
              f"{r.get('graph_pool_mib', 0):.0f}",
              f"{r['seconds']:.2f}" if "seconds" in r else r.get("error", "-")]
             for r in rows]
    print(format_table(headers, table))
    out = Path(args.out) if args.out else scratch_dir() / (
        f"activation-memory-{model_slug(args.model)}-{args.device}-"
        f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"results: {out}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
