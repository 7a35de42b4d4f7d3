"""Where a decode step's time goes, stage by stage: `python3 tools/profile_step.py`.

A lead's tool (rewritten for M4). For each stage and batch size it builds an `LLM` on
the device, adds `batch` requests with random 200-token prompts (greedy, ignore_eos,
max_tokens enough for the whole run), steps until every one has had its prefill, runs a
few warm-up decode steps, then measures decode steps, each with all `batch` sequences:

- wall ms: host time around `engine.step()`, measured without the profiler, the GPU idle
  before each step. A step ends by copying sampled tokens to the host, so it includes
  waiting for the GPU;
- steady ms: the same steps back to back, nothing waited for between them, over their
  count: with async scheduling (`:async`) the host's work overlaps the GPU's here;
- GPU ms: the sum of the CUDA kernels' durations in the step, from torch.profiler (CUPTI
  records the kernels inside CUDA graph replays too on recent CUDA; this is checked
  once per run on a tiny graph, and where the profiler cannot see them, a row that
  replays graphs falls back to the CUDA-event time from the step's start to its end,
  which includes idle gaps: `gpu_time_source` in the JSON says which);
- GPU busy %: GPU ms over wall ms;
- kernels/step: kernel launches the profiler saw (a graph replay counts its kernels);
- CPU ms: host time not spent blocked on the GPU: the wall time less the step's time in
  cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize and in blocking
  copies (a synchronous cudaMemcpy, or an async one during which a device-to-host copy
  ran), as the profiler saw them. The profiler slows the host by a few microseconds per
  op, so the table takes the unprofiled wall less the profiled blocked time; the JSON
  also has `cpu_ms_profiled` (the profiled wall less the blocked time, the profiler's
  cost included) and `profiler_overhead_ms` (profiled wall less unprofiled wall);
- the top 10 kernels by GPU time per step, and the top 10 host-side ops by self CPU time.

With `--mixed-budget B` (M5+: stages with chunked prefill) the measured steps are mixed:
after the warm-up one more request arrives with a prompt long enough to last the whole
measurement, and every measured step holds the `batch` decodes plus a chunk of that
prompt filling the rest of a budget of B tokens (`max_num_batched_tokens=B`). That is
how M5's CUDA graphs for mixed steps are compared with eager mixed steps.

Rows are stage packages (or m3, m4) and, with a suffix, a setting: `m4_flash_attn:eager`
runs it with `enforce_eager=True` (no CUDA graphs), `:graphs` with `enforce_eager=False`,
`:gptq` with `quantization="gptq"` (M7: the dummy weights rounded to 4 bits), `:async`
with `async_scheduling=True` (M4+: the next step scheduled while one runs);
`--m4-eager` adds the `:eager` row of every M4+ stage asked for. Each LLM is freed
(del, gc, empty_cache) before the next is built.

The KV cache is sized for the run, not by gpu_memory_utilization: `kv_cache_memory`
holds batch x (prompt + every step's token) tokens in whole blocks, plus 25% (at least
64 MiB), and `max_model_len` is prompt + max_tokens; so even M3 at batch 256 fits, no
sequence is preempted, and building the engine skips the memory profiling pass.

    python3 tools/profile_step.py --stages m3_paged_kv,m4_flash_attn --batches 1,64,256 \\
        --model dummy:qwen2.5-0.5b --out profile.json   # ~1 min on an H100 (2 with --m4-eager)
    python3 tools/profile_step.py --device cpu --stages m3_paged_kv --batches 1,2 \\
        --model dummy:tiny-llama --steps 3                         # CPU smoke

On the CPU (`--device cpu`) only the CPU profiler runs: the GPU columns are empty
(None) and CPU ms is the wall time. The JSON (default
bench/scratch/profile-<model>-<device>-<date>.json) holds bench/compare.py's provenance
(command, git_commit, git_dirty, date, machine, versions) and one row per (stage,
batch) with per-step lists and the top kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import stages as registry  # noqa: E402
from bench.compare import model_slug, scratch_dir  # noqa: E402
from bench.provenance import format_table, provenance  # noqa: E402

PROG = "python3 tools/profile_step.py"
STEP_MARK = "folovllm::decode_step"  # the profiler annotation around each measured step
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize"}
# row suffix -> the EngineConfig setting it makes
SETTINGS = {"eager": {"enforce_eager": True}, "graphs": {"enforce_eager": False},
            "gptq": {"quantization": "gptq"}, "async": {"async_scheduling": True}}
PROFILER_WARMUP = 2  # profiled steps thrown away (CUPTI's start-up)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Profile decode steps of FoloVLLM stages: per step the wall time, the "
                    "CPU time (not blocked on the GPU), the GPU busy time (sum of kernel "
                    "durations), GPU busy %, kernels per step and the top kernels; a "
                    "table and a JSON.",
        epilog="Rows: STAGE or STAGE:eager / STAGE:graphs (enforce_eager True / False) / "
               "STAGE:gptq (M7's 4-bit weights) / STAGE:async (async_scheduling=True), "
               "STAGE a package (m3_paged_kv) or short name (m3). The KV cache is sized "
               "to the run (see --kv-cache-memory).")
    p.add_argument("--stages", default="m3_paged_kv,m4_flash_attn",
                   help="comma-separated rows (default m3_paged_kv,m4_flash_attn)")
    p.add_argument("--batches", default="1,64,256",
                   help="comma-separated batch sizes: sequences decoding at once "
                        "(default 1,64,256)")
    p.add_argument("--model", default="dummy:qwen2.5-0.5b",
                   help="dummy:NAME, 'default' or a local HF folder (default dummy:qwen2.5-0.5b)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default), or cpu for a smoke run with the CPU profiler only")
    p.add_argument("--steps", type=int, default=20,
                   help="decode steps measured, once without and once with the profiler "
                        "(default 20)")
    p.add_argument("--warmup", type=int, default=3, help="decode steps before measuring (3)")
    p.add_argument("--prompt-len", type=int, default=200, help="tokens per prompt (200)")
    p.add_argument("--m4-eager", action="store_true",
                   help="also profile every M4+ stage asked for with enforce_eager=True "
                        "(a STAGE:eager row)")
    p.add_argument("--mixed-budget", type=int, metavar="TOKENS",
                   help="measure mixed steps: the decodes plus a chunk of a long prompt "
                        "filling a budget of TOKENS per step (stages with chunked prefill)")
    p.add_argument("--kv-cache-memory", type=int, metavar="BYTES",
                   help="KV cache bytes for every row (default: sized to the run)")
    p.add_argument("--out", metavar="FILE.json",
                   help="where the JSON goes (default bench/scratch/profile-<model>-<device>-"
                        "<date>.json)")
    p.add_argument("--top", type=int, default=10, help="kernels listed per row (10)")
    return p


class UsageError(Exception):
    """A bad argument: one `error:` line, exit code 2."""


def parse_rows(text: str, m4_eager: bool) -> list[tuple[str, str | None]]:
    """'m3,m4_flash_attn:eager' -> [('m3_paged_kv', None), ('m4_flash_attn', 'eager')]."""
    rows = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, setting = item.partition(":")
        try:
            stage = registry.get(name)
        except KeyError:
            raise UsageError(f"--stages: unknown stage {name!r}") from None
        if not stage.present:
            raise UsageError(f"--stages: {stage.package} is not in this checkout")
        if "generate" not in stage.features:
            raise UsageError(f"--stages: {stage.package} cannot generate")
        if setting and setting not in SETTINGS:
            raise UsageError(f"--stages: {item!r}: the setting after ':' is one of "
                             f"{', '.join(SETTINGS)}")
        rows.append((stage.package, setting or None))
    if m4_eager:
        rows += [(pkg, "eager") for pkg, s in list(rows)
                 if s is None and "flash_attn" in registry.get(pkg).features
                 and (pkg, "eager") not in rows]
    if not rows:
        raise UsageError("--stages: give at least one stage")
    return rows


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--batches: {text!r} is not a comma-separated list of integers") \
            from None
    if not batches or min(batches) < 1:
        raise UsageError("--batches: give batch sizes >= 1")
    return batches


# -- the profiler's events ------------------------------------------------------------
def _activity(event) -> str:
    """libkineto's activity type ('kernel', 'gpu_memcpy', 'cuda_runtime', ...), guessed
    from the device and name where this torch does not say."""
    try:
        return str(event.activity_type())
    except AttributeError:
        name = event.name()
        if "cuda" in str(event.device_type()).lower():
            return ("gpu_memcpy" if name.startswith("Memcpy") else
                    "gpu_memset" if name.startswith("Memset") else "kernel")
        return "cuda_runtime" if name.startswith("cu") else "cpu_op"


def _is_gpu(event) -> bool:
    return "cuda" in str(event.device_type()).lower()


def split_steps(events) -> dict:
    """Per profiled step (the STEP_MARK annotations): wall, blocked and kernel time, the
    kernel count, graph launches; and kernel time by name over all steps."""
    marks = sorted((e for e in events if e.name() == STEP_MARK and not _is_gpu(e)),
                   key=lambda e: e.start_ns())
    steps = [{"start": m.start_ns(), "end": m.start_ns() + m.duration_ns(),
              "wall_ns": m.duration_ns(), "blocked_ns": 0, "kernel_ns": 0, "kernels": 0,
              "graph_launches": 0} for m in marks]
    if not steps:
        return {"steps": [], "by_name": {}}
    # a step's GPU work runs between its start and the next step's start
    bounds = [s["start"] for s in steps[1:]] + [steps[-1]["end"] + 10 ** 6]

    def step_of(t: int):
        for s, end in zip(steps, bounds):
            if s["start"] <= t < end:
                return s
        return None

    d2h = []  # (start, end) of device-to-host copies on the GPU
    by_name: dict[str, list[int]] = {}
    for e in events:
        if not _is_gpu(e) or e.name() == STEP_MARK:
            continue
        kind = _activity(e)
        if kind == "gpu_memcpy" and "DtoH" in e.name():
            d2h.append((e.start_ns(), e.start_ns() + e.duration_ns()))
        if kind != "kernel":
            continue
        s = step_of(e.start_ns())
        if s is None:
            continue
        s["kernel_ns"] += e.duration_ns()
        s["kernels"] += 1
        totals = by_name.setdefault(e.name(), [0, 0])
        totals[0] += e.duration_ns()
        totals[1] += 1
    for e in events:
        if _is_gpu(e):
            continue
        name = e.name()
        if not name.startswith("cu") or _activity(e) == "cpu_op":
            continue
        s = step_of(e.start_ns())
        if s is None or e.start_ns() >= s["end"]:
            continue
        start, end = e.start_ns(), e.start_ns() + e.duration_ns()
        if name in SYNC_CALLS:
            s["blocked_ns"] += e.duration_ns()
        elif "Memcpy" in name:
            synchronous = "Async" not in name
            if synchronous or any(a < end and b > start for a, b in d2h):
                s["blocked_ns"] += e.duration_ns()
        elif name.startswith(("cudaGraphLaunch", "cuGraphLaunch")):
            s["graph_launches"] += 1
    return {"steps": steps, "by_name": by_name}


def profiler_sees_graph_kernels() -> bool:
    """Does torch.profiler record the kernels of a CUDA graph replay on this machine?"""
    import torch
    from torch.profiler import ProfilerActivity, profile

    x = torch.zeros(1024, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        x.add_(1)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.add_(1)
        x.mul_(2)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.profiler.kineto_results.events()
               if _is_gpu(e) and _activity(e) == "kernel"]
    del graph
    return len(kernels) >= 2


# -- one row --------------------------------------------------------------------------
def kv_budget(mc, batch: int, tokens_per_seq: int, block_size: int, itemsize: int) -> int:
    """Bytes for `batch` sequences of `tokens_per_seq` tokens in whole blocks, + 25%."""
    per_token = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * itemsize
    blocks = -(-tokens_per_seq // block_size) + 1
    return max(64 * 2 ** 20, int(1.25 * batch * blocks * block_size * per_token))


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def profile_row(package: str, setting: str | None, batch: int, args, mc) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    stage = importlib.import_module(package)
    label = package + (f":{setting}" if setting else "")
    cuda = args.device == "cuda"
    row = {"row": label, "stage": package, "setting": setting, "batch": batch}
    field_names = {f.name for f in dataclasses.fields(stage.EngineConfig)}
    # decode steps: warm-up, the unprofiled ones, the profiler's warm-up and its steps
    decode_steps = args.warmup + 3 * args.steps + PROFILER_WARMUP
    # every step until the last prefill gives the early requests a token too: a bound on
    # those steps (prompts admitted per token budget) keeps every request from finishing
    budget = max(1, (args.mixed_budget or stage.EngineConfig.max_num_batched_tokens) - batch)
    max_tokens = decode_steps + -(-batch * args.prompt_len // budget) + 8
    max_len = args.prompt_len + max_tokens + 8
    block_size = getattr(stage.EngineConfig, "block_size", 16)
    kv_bytes = args.kv_cache_memory or kv_budget(mc, batch, max_len, block_size,
                                                 2 if cuda else 4)
    kwargs = {"device": args.device, "kv_cache_memory": kv_bytes, "max_model_len": max_len}
    if batch > stage.EngineConfig.max_batch_size:
        kwargs["max_batch_size"] = batch
    long_len = 0  # the prompt whose chunks fill mixed steps (--mixed-budget)
    if args.mixed_budget:
        if "enable_chunked_prefill" not in field_names:
            row["error"] = f"{package} has no chunked prefill (--mixed-budget)"
            return row
        if args.mixed_budget <= batch:
            row["error"] = f"--mixed-budget {args.mixed_budget} leaves no room beside {batch}"
            return row
        chunk = args.mixed_budget - batch
        long_len = (decode_steps + 4) * chunk
        kwargs.update(max_num_batched_tokens=args.mixed_budget,
                      max_model_len=max(max_len, long_len + 8))
        kwargs["kv_cache_memory"] = kv_bytes + kv_budget(mc, 1, long_len + 8, block_size,
                                                         2 if cuda else 4)
        row.update(mixed_budget=args.mixed_budget, chunk_tokens=chunk)
    if setting is not None:
        (key, value), = SETTINGS[setting].items()
        if key not in field_names:
            row["error"] = f"{package}'s EngineConfig has no {key}"
            return row
        kwargs[key] = value
    row["engine_args"] = kwargs
    began = time.perf_counter()
    llm = stage.LLM(args.model, **kwargs)
    row["load_s"] = time.perf_counter() - began
    try:
        engine = llm.engine
        row["config"] = {k: v for k, v in dataclasses.asdict(llm.config).items()
                         if isinstance(v, (int, float, str, bool, type(None)))}
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        gen = torch.Generator().manual_seed(0)
        params = stage.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        high = min(mc.vocab_size, 5000)
        for i in range(batch):
            prompt = torch.randint(3, high, (args.prompt_len,), generator=gen).tolist()
            engine.add_request(f"r{i}", prompt, params)

        # prefills until every request has its first token; then warm-up decodes
        started, prefill_steps, t0 = set(), 0, time.perf_counter()
        while len(started) < batch:
            for out in engine.step():
                if out.outputs and out.outputs[0].token_ids:
                    started.add(out.request_id)
            prefill_steps += 1
            if prefill_steps > batch + 100:
                raise RuntimeError(f"{len(started)} of {batch} requests started after "
                                   f"{prefill_steps} steps")
        sync()
        row.update(prefill_steps=prefill_steps, prefill_s=time.perf_counter() - t0)

        def step() -> int:
            n = len(engine.step())
            if n != batch:
                raise RuntimeError(f"a decode step ran {n} sequences, not {batch} "
                                   "(preempted or finished?)")
            return n

        for _ in range(args.warmup):
            step()
        if long_len:  # from now on each step is the decodes and a chunk of this prompt
            prompt = torch.randint(3, high, (long_len,), generator=gen).tolist()
            engine.add_request("long", prompt, stage.SamplingParams(
                temperature=0, max_tokens=1, ignore_eos=True))

        # unprofiled: wall time; and the CUDA-event span of the step (the fallback)
        walls, spans = [], []
        for _ in range(args.steps):
            sync()
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
            t0 = time.perf_counter()
            step()
            walls.append((time.perf_counter() - t0) * 1e3)
            if cuda:
                e1.record()
                e1.synchronize()
                spans.append(e0.elapsed_time(e1))

        # unprofiled, back to back: the steps' rate when nothing waits between them (what
        # async scheduling overlaps: the host's work for the next step with this one)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        row["steady_ms"] = (time.perf_counter() - t0) * 1e3 / args.steps

        # profiled
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities,
                     schedule=schedule(wait=0, warmup=PROFILER_WARMUP, active=args.steps,
                                       repeat=1)) as prof:
            for _ in range(PROFILER_WARMUP + args.steps):
                sync()
                with record_function(STEP_MARK):
                    step()
                prof.step()
        parsed = split_steps(prof.profiler.kineto_results.events())
        summarize(row, parsed, walls, spans, args, cuda)
        row["top_cpu_ops"] = top_cpu_ops(prof, args.steps, args.top)
        del prof
        kv = engine.kv_cache_stats() if hasattr(engine, "kv_cache_stats") else {}
        row["num_preemptions"] = kv.get("num_preemptions")
        row["kv_cache_bytes"] = kv.get("kv_cache_bytes")
    finally:
        del llm
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def top_cpu_ops(prof, steps: int, top: int) -> list[dict]:
    """The host-side ops (aten ops, CUDA runtime calls, ...) with the most self CPU time
    per step, the waits on the GPU left out."""
    averages = [a for a in prof.key_averages() if a.key != STEP_MARK
                and not a.key.startswith("ProfilerStep") and a.key not in SYNC_CALLS
                and a.self_cpu_time_total > 0]
    averages.sort(key=lambda a: -a.self_cpu_time_total)
    return [{"name": a.key, "self_us_per_step": a.self_cpu_time_total / steps,
             "calls_per_step": a.count / steps} for a in averages[:top]]


def summarize(row: dict, parsed: dict, walls: list[float], spans: list[float], args,
              cuda: bool) -> None:
    steps = parsed["steps"]
    if len(steps) != args.steps:
        raise RuntimeError(f"the profiler recorded {len(steps)} steps, not {args.steps}")
    prof_wall = [s["wall_ns"] / 1e6 for s in steps]
    cpu = [(s["wall_ns"] - s["blocked_ns"]) / 1e6 for s in steps]
    blocked = _median([s["blocked_ns"] / 1e6 for s in steps])
    row.update(wall_ms=_median(walls), wall_ms_per_step=walls,
               wall_ms_profiled=_median(prof_wall), blocked_ms=blocked,
               # the unprofiled wall less the blocked time: without the profiler's cost
               cpu_ms=max(0.0, _median(walls) - blocked),
               cpu_ms_profiled=_median(cpu), cpu_ms_profiled_per_step=cpu,
               graph_launches_per_step=_median([s["graph_launches"] for s in steps]))
    row["profiler_overhead_ms"] = row["wall_ms_profiled"] - row["wall_ms"]
    if not cuda:
        row.update(gpu_ms=None, gpu_busy=None, kernels_per_step=None, gpu_time_source=None,
                   top_kernels=None)
        return
    gpu = [s["kernel_ns"] / 1e6 for s in steps]
    kernels = [s["kernels"] for s in steps]
    row["event_span_ms"] = _median(spans)
    graphs_hidden = row["graph_launches_per_step"] and not args.graph_kernels_visible
    if sum(kernels) == 0 or graphs_hidden:
        row.update(gpu_ms=row["event_span_ms"], gpu_ms_per_step=spans,
                   gpu_time_source="cuda_events: the profiler saw no kernels of the graph "
                                   "replays; this is the step's start-to-end span on the "
                                   "GPU, idle gaps included (an upper bound)",
                   kernels_per_step=None)
    else:
        row.update(gpu_ms=_median(gpu), gpu_ms_per_step=gpu,
                   gpu_time_source="profiler: sum of kernel durations",
                   kernels_per_step=_median(kernels))
    row["gpu_busy"] = row["gpu_ms"] / row["wall_ms"] if row["wall_ms"] else None
    n = len(steps)
    top = sorted(parsed["by_name"].items(), key=lambda kv: -kv[1][0])[:args.top]
    total = sum(v[0] for v in parsed["by_name"].values()) or 1
    row["top_kernels"] = [{"name": name, "us_per_step": ns / n / 1e3,
                           "calls_per_step": calls / n, "share": ns / total}
                          for name, (ns, calls) in top]


# -- output ---------------------------------------------------------------------------
def _f(x, fmt: str):
    return None if x is None else format(x, fmt)


def table(rows: list[dict]) -> str:
    headers = ["stage", "batch", "wall ms", "steady ms", "CPU ms", "GPU ms", "GPU busy %",
               "kernels/step", "prof wall ms", "note"]
    body = [[r["row"], r["batch"], _f(r.get("wall_ms"), ".2f"), _f(r.get("steady_ms"), ".2f"),
             _f(r.get("cpu_ms"), ".2f"),
             _f(r.get("gpu_ms"), ".2f"),
             _f(None if r.get("gpu_busy") is None else 100 * r["gpu_busy"], ".0f"),
             _f(r.get("kernels_per_step"), ".0f"), _f(r.get("wall_ms_profiled"), ".2f"),
             "ERROR" if r.get("error") else
             "gpu=event span" if str(r.get("gpu_time_source", "")).startswith("cuda_events")
             else ""] for r in rows]
    return format_table(headers, body)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        rows_spec = parse_rows(args.stages, args.m4_eager)
        batches = parse_batches(args.batches)
        if args.steps < 1 or args.warmup < 0 or args.prompt_len < 1:
            raise UsageError("--steps >= 1, --warmup >= 0, --prompt-len >= 1")
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no GPU (--device cpu runs a smoke "
              "profile with the CPU profiler only)", file=sys.stderr)
        return 2
    loader = importlib.import_module(f"{rows_spec[0][0]}.model_executor.model_loader")
    try:
        mc = loader.load_model_config(args.model)
    except ValueError as exc:
        print(f"error: --model: {exc}", file=sys.stderr)
        return 2
    results = provenance(PROG, argv, args.device)
    args.graph_kernels_visible = (profiler_sees_graph_kernels() if args.device == "cuda"
                                  else None)
    began = time.perf_counter()
    rows = []
    for package, setting in rows_spec:
        for batch in batches:
            label = package + (f":{setting}" if setting else "")
            print(f"profiling {label} at batch {batch} ...", flush=True)
            try:
                row = profile_row(package, setting, batch, args, mc)
            except Exception as exc:  # a row that fails is a row, not the end of the run
                row = {"row": label, "stage": package, "setting": setting, "batch": batch,
                       "error": f"{type(exc).__name__}: {exc}"[:500]}
            if row.get("error"):
                print(f"error: {label} batch {batch}: {row['error']}", file=sys.stderr,
                      flush=True)
            rows.append(row)
    results.update(
        device=args.device, model=args.model, prompt_len=args.prompt_len, steps=args.steps,
        warmup=args.warmup, profiler_sees_graph_kernels=args.graph_kernels_visible,
        notes={"wall_ms": "median host time around engine.step(), without the profiler",
               "steady_ms": "steps back to back without waiting between them, per step",
               "cpu_ms": "wall_ms less the median time a profiled step was blocked on the "
                         "GPU (synchronize calls, blocking copies); cpu_ms_profiled: the "
                         "profiled wall less that, the profiler's own cost included",
               "gpu_ms": "median per step: see each row's gpu_time_source",
               "kv_cache_memory": "sized to the run unless --kv-cache-memory was given"},
        rows=rows, seconds=time.perf_counter() - began)
    print()
    print(table(rows))
    for r in rows:  # the top 3 of each list (the JSON has --top)
        for what, items, key in (("gpu", r.get("top_kernels"), "us_per_step"),
                                 ("cpu", r.get("top_cpu_ops"), "self_us_per_step")):
            for item in (items or [])[:3]:
                print(f"  {r['row']} b{r['batch']} {what}: {item[key]:8.1f} us/step "
                      f"{item['calls_per_step']:6.1f}x  {item['name'][:70]}")
    out = Path(args.out) if args.out else scratch_dir() / (
        f"profile-{model_slug(args.model)}-{args.device}-"
        f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"results: {out}  ({results['seconds']:.0f} s)")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
