"""Compare the stages (and transformers) on one workload: `python bench/compare.py`.

Introduced with the bench (M1). Each milestone runs in its own process (`bench/worker.py`)
on the identical workload: the same token-id prompts, lengths, arrival times and seed,
greedy, `ignore_eos` so every request produces exactly its output length. The table
shows TTFT, TPOT and end-to-end latency (mean, p50, p99), output tokens/s, requests/s,
peak memory (CUDA: peak allocated by torch; CPU: peak RSS of the process), KV-cache use
(for stages whose engine has `kv_cache_stats()`), each row's throughput as a ratio to the
first row and, on CUDA, its fraction of the workload's roofline (see bench/roofline.py).

    python bench/compare.py --milestones m1,hf --workload latency --device cpu
    python bench/compare.py --milestones m1,m2,m3 --workload throughput \\
        --model dummy:qwen2.5-0.5b --device cuda --num-prompts 64

Results go to bench/results/<workload>-<model>-<device>-<YYYYMMDD-HHMMSS>.json with a PNG
plot of the same name (`--out-dir` changes the folder). A file holds: workload, model,
device, date (UTC), machine, versions, config (workload and engine settings), roofline
(null off CUDA), and one row per milestone: its note (how it ran the workload), summary
(ttft/tpot in ms, e2e in s, tokens/s, requests/s, total time, peak MiB, throughput
ratio, roofline fraction, kv_cache) and per-request samples.

Milestones: m1..m7 are the stage packages present in this checkout (m0 cannot generate);
`hf` is transformers `generate` on the same weights (for dummy models, the stage's dummy
weights are saved to a temporary Hugging Face folder first).
"""

import argparse
import datetime as dt
import importlib
import importlib.metadata
import json
import os
import platform
import re
import signal
import socket
import shlex
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the stages and `bench` importable
    sys.path.insert(0, str(REPO))

from bench import report, stages  # noqa: E402
from bench.workloads import WORKLOADS, build_workload  # noqa: E402

STAGES = {s.short: s.package for s in stages.ALL_STAGES}  # "m1" -> "m1_basic" (bench/stages.py)
PEERS = ("hf",)
DEFAULT_RESULTS = REPO / "bench" / "results"
_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6,
          "g": 10 ** 9, "gb": 10 ** 9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30,
          "t": 10 ** 12, "tb": 10 ** 12, "tib": 2 ** 40}


class BenchError(Exception):
    """A user error: printed as one `error:` line, exit code 2."""


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1073741824' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give bytes or a number with KiB/MiB/GiB/KB/MB/GB")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return value


def parse_length(text: str) -> int | tuple[int, int]:
    """'128' -> 128; '100:1024' -> (100, 1024), drawn uniformly per request."""
    lo, sep, hi = str(text).partition(":")
    try:
        value = (int(lo), int(hi)) if sep else int(lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or LO:HI") from None
    low, high = value if sep else (value, value)
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= LO <= HI")
    return value


def parse_engine_arg(text: str) -> tuple[str, object]:
    """KEY=VALUE; VALUE read as JSON when it parses (16, 0.9, true, null), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/compare.py",
        description="Run stages of FoloVLLM (and transformers) on one identical workload, "
                    "each in its own process, and print one comparison table; results JSON "
                    "and a PNG plot go to --out-dir.",
        epilog="Workloads: latency (one request at a time; 4 prompts, 128 in / 128 out), "
               "throughput (all at t=0; 256 prompts, lengths uniform in [100, 1024]), online "
               "(Poisson arrivals; 64 prompts, 128/128, 4 req/s), prefix (512-token shared "
               "prefix + 32-token questions, 64 out; 32 prompts).")
    p.add_argument("--milestones", required=True,
                   help="comma-separated rows: m1..m7 (the stages present) and hf "
                        "(transformers), e.g. m1,hf")
    p.add_argument("--workload", default="latency", choices=WORKLOADS,
                   help="(default: latency)")
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), dummy:NAME, or a local HF folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when torch sees a GPU, else cpu")
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU (every row uses the same)")
    p.add_argument("--num-prompts", type=int, help="default: depends on the workload")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the prompts, lengths, arrivals and dummy weights")
    p.add_argument("--request-rate", type=float,
                   help="online workload: requests per second (default 4)")
    p.add_argument("--input-len", type=parse_length, metavar="N|LO:HI",
                   help="prompt length, fixed or uniform in [LO, HI] (prefix workload: "
                        "the question length)")
    p.add_argument("--output-len", type=parse_length, metavar="N|LO:HI",
                   help="output length, fixed or uniform in [LO, HI]")
    p.add_argument("--prefix-len", type=int, help="prefix workload: shared prefix (512)")
    p.add_argument("--max-model-len", type=int,
                   help="engine max_model_len (default: the model's limit, capped at 4096)")
    p.add_argument("--max-batch-size", type=int,
                   help="engine max_batch_size (stages that have it), hf batch size, and "
                        "the roofline schedule's batch bound (default: all prompts)")
    p.add_argument("--kv-cache-memory", type=parse_bytes,
                   help="engine kv_cache_memory budget (stages that have it): bytes or "
                        "e.g. 2GiB")
    p.add_argument("--engine-arg", type=parse_engine_arg, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="any other EngineConfig field, e.g. block_size=16 (repeatable); "
                        "stages without that field ignore it and say so")
    p.add_argument("--threads", type=int,
                   help="CPU: torch threads in every worker (default: torch's default)")
    p.add_argument("--out-dir", default=str(DEFAULT_RESULTS),
                   help="where the results JSON and PNG go (default bench/results)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def resolve_milestones(text: str) -> list[tuple[str, str | None]]:
    """'m1,hf' -> [('m1', 'm1_basic'), ('hf', None)]; BenchError for a bad name."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise BenchError("--milestones: give at least one, e.g. m1,hf")
    present = [m for m, pkg in STAGES.items() if "generate" in stages.get(m).features
               and (REPO / pkg / "engine" / "llm_engine.py").is_file()]
    choices = ", ".join(present + list(PEERS))
    out = []
    for name in names:
        if name in (m for m, _ in out):
            raise BenchError(f"milestone {name!r} is listed twice")
        if name in PEERS:
            out.append((name, None))
        elif name in STAGES and "generate" not in stages.get(name).features:
            raise BenchError(f"milestone {name!r} ({STAGES[name]}) cannot generate (it runs "
                             f"one forward pass and has no engine); choose from {choices}")
        elif name in STAGES:
            pkg = STAGES[name]
            if not (REPO / pkg).is_dir():
                raise BenchError(f"milestone {name!r} ({pkg}) does not exist in this "
                                 f"checkout yet; choose from {choices}")
            if name not in present:
                raise BenchError(f"milestone {name!r} ({pkg}) has no engine "
                                 f"(engine/llm_engine.py); choose from {choices}")
            out.append((name, pkg))
        else:
            raise BenchError(f"unknown milestone {name!r}; choose from {choices}")
    return out


def model_slug(model: str) -> str:
    if model.startswith("dummy:"):
        name = "dummy-" + model[len("dummy:"):]
    elif model == "default":
        name = "default"
    else:
        name = Path(model).expanduser().resolve().name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(result: dict) -> dict:
    """The row's summary from a worker's result (or all-null for a failed row)."""
    keys = ["ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms", "tpot_mean_ms", "tpot_p50_ms",
            "tpot_p99_ms", "e2e_mean_s", "e2e_p50_s", "e2e_p99_s", "output_tokens_per_s",
            "requests_per_s", "total_time_s", "peak_memory_mib", "throughput_ratio",
            "roofline_fraction", "kv_cache"]
    summary = dict.fromkeys(keys)
    if "error" in result:
        return summary
    samples = result["samples"]
    for name, scale, unit in (("ttft", 1e3, "ms"), ("tpot", 1e3, "ms"), ("e2e", 1.0, "s")):
        values = [s[f"{name}_s"] * scale for s in samples if s[f"{name}_s"] is not None]
        if values:
            summary[f"{name}_mean_{unit}"] = sum(values) / len(values)
            summary[f"{name}_p50_{unit}"] = percentile(values, 50)
            summary[f"{name}_p99_{unit}"] = percentile(values, 99)
    total = result["total_time_s"]
    summary["total_time_s"] = total
    summary["output_tokens_per_s"] = sum(s["output_len"] for s in samples) / total
    summary["requests_per_s"] = len(samples) / total
    summary["peak_memory_mib"] = result["peak_memory_mib"]
    summary["kv_cache"] = result.get("kv_cache")
    return summary


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """HEAD (with "-dirty" if tracked files changed), unless FOLOVLLM_GIT_COMMIT names the
    commit: a copy of the tree on another machine (the GPU's) has no or a stale .git."""
    if os.environ.get("FOLOVLLM_GIT_COMMIT"):
        return os.environ["FOLOVLLM_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def prepare_hf_folder(model: str, package: str, dtype: str, seed: int, folder: Path) -> None:
    """Save a stage's dummy weights (and a transformers config) as a Hugging Face folder.

    Our parameter names are Hugging Face's, so transformers loads the file as it is."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    loader = importlib.import_module(f"{package}.model_executor.model_loader")
    name = model[len("dummy:"):]
    mc = loader.load_model_config(model)
    net = loader.load_model(model, mc, getattr(torch, dtype), torch.device("cpu"), seed=seed)
    # named_parameters lists a tied lm_head once, under the embedding's name
    tensors = {n: p.detach().contiguous() for n, p in net.named_parameters()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del net, tensors
    hf = dict(loader.DUMMY_CONFIGS[name])
    model_type = hf.pop("model_type")
    config = AutoConfig.for_model(model_type, **hf)
    config.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                             "qwen3": "Qwen3ForCausalLM"}[model_type]]
    config.save_pretrained(str(folder))


def run_worker(spec: dict, scratch: Path, label: str) -> dict:
    """Run one job of bench/worker.py in a fresh process of this Python."""
    spec_path, out_path = scratch / f"{label}-spec.json", scratch / f"{label}-result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
    proc = subprocess.Popen([sys.executable, "-m", "bench.worker", str(spec_path),
                             str(out_path)], cwd=REPO, env=env)
    try:
        proc.wait()
    finally:  # interrupted or terminated: do not leave the worker running (on a GPU)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if out_path.is_file():
        return json.loads(out_path.read_text())
    return {"error": f"the worker exited with code {proc.returncode} without a result "
                     "(killed, e.g. out of memory?)"}


def plot(results: dict, path: Path) -> Path | None:
    """Bars of output tokens/s, mean TTFT and mean TPOT per milestone."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed; no plot written", file=sys.stderr)
        return None
    names = [row["milestone"] for row in results["rows"]]
    panels = [("output_tokens_per_s", "output tokens/s"), ("ttft_mean_ms", "TTFT mean (ms)"),
              ("tpot_mean_ms", "TPOT mean (ms)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
              "#8c8c8c", "#ccb974"]
    for ax, (key, label) in zip(axes, panels):
        values = [(row.get("summary") or {}).get(key) for row in results["rows"]]
        bars = ax.bar(names, [v or 0 for v in values],
                      color=[colors[i % len(colors)] for i in range(len(names))])
        for bar, v in zip(bars, values):
            ax.annotate(report.fmt_number(v), (bar.get_x() + bar.get_width() / 2,
                                               bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(label)
        ax.margins(y=0.15)
    fig.suptitle(report.caption(results).replace("`", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the running worker is stopped
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    milestones = resolve_milestones(args.milestones)
    for name in ("num_prompts", "max_model_len", "max_batch_size", "prefix_len", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    if args.request_rate is not None and args.workload != "online":
        raise BenchError("--request-rate applies to the online workload only")
    if args.prefix_len is not None and args.workload != "prefix":
        raise BenchError("--prefix-len applies to the prefix workload only")
    model = args.model
    if not (model == "default" or model.startswith("dummy:")):
        model = str(Path(model).expanduser().resolve())  # workers run from the repo root

    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # no CUDA context here
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for, but torch sees no GPU")
    dtype = args.dtype if args.dtype != "auto" else (
        "bfloat16" if device == "cuda" else "float32")
    stage_pkgs = [pkg for _, pkg in milestones if pkg is not None]
    loader_pkg = stage_pkgs[0] if stage_pkgs else stages.stages_with("generate")[0]
    loader = importlib.import_module(f"{loader_pkg}.model_executor.model_loader")
    try:
        mc = loader.load_model_config(model)
        model_path = loader.resolve_model_path(model)
        wl = build_workload(args.workload, mc.vocab_size, seed=args.seed,
                            num_prompts=args.num_prompts, input_len=args.input_len,
                            output_len=args.output_len, request_rate=args.request_rate,
                            prefix_len=args.prefix_len)
    except ValueError as exc:
        raise BenchError(str(exc)) from exc
    max_len = args.max_model_len or min(mc.max_position_embeddings, 4096)
    longest = max(len(p) + n for p, n in zip(wl.prompts, wl.output_lens))
    if longest > max_len:
        raise BenchError(f"the workload needs up to {longest} tokens per sequence but "
                         f"max_model_len is {max_len}; pass --max-model-len or shorter "
                         "--input-len / --output-len")

    engine = {"model": model, "device": device, "dtype": dtype, "seed": args.seed,
              "max_model_len": args.max_model_len, "max_batch_size": args.max_batch_size,
              "kv_cache_memory": args.kv_cache_memory}
    engine.update(dict(args.engine_arg))
    engine = {k: v for k, v in engine.items() if v is not None}
    start = dt.datetime.now(dt.timezone.utc)
    lens = [len(p) for p in wl.prompts]
    print(f"bench: {args.workload} workload, {wl.num_prompts} prompts "
          f"(input {min(lens)}..{max(lens)}, output {min(wl.output_lens)}.."
          f"{max(wl.output_lens)} tokens), model {args.model}, {device} {dtype}, rows "
          f"{', '.join(m for m, _ in milestones)}", file=sys.stderr, flush=True)

    rows, gpu, roofline = [], None, None
    with tempfile.TemporaryDirectory(prefix="folovllm-bench-") as tmp:
        scratch = Path(tmp)
        if device == "cuda":
            print("bench: measuring copy bandwidth and bf16 matmul rate", file=sys.stderr,
                  flush=True)
            machine = run_worker({"kind": "roofline", "device": device}, scratch, "roofline")
            if "error" in machine:
                raise BenchError(f"cannot measure the GPU: {machine['error']}")
            gpu = machine["gpu"]
            from bench.roofline import model_cost, simulate

            itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
            bound = 1 if wl.sequential else (args.max_batch_size or wl.num_prompts)
            sim = simulate(model_cost(mc, itemsize), lens, wl.output_lens, wl.arrival_times,
                           bound, machine["bandwidth_gbps"] * 1e9,
                           machine["matmul_tflops"] * 1e12, prefix_len=wl.prefix_len)
            roofline = {"bandwidth_gbps": machine["bandwidth_gbps"],
                        "matmul_tflops": machine["matmul_tflops"], "time_s": sim["time_s"],
                        "bytes": sim["bytes"], "flops": sim["flops"]}
        hf_path = str(model_path) if model_path is not None else None
        for index, (name, pkg) in enumerate(milestones):
            label = f"{name} ({pkg})" if pkg else f"{name} (transformers)"
            print(f"bench: [{index + 1}/{len(milestones)}] {label}", file=sys.stderr,
                  flush=True)
            spec = {"milestone": name, "package": pkg, "workload": wl.to_dict(),
                    "engine": engine, "device": device, "dtype": dtype,
                    "threads": args.threads, "progress": not args.no_progress}
            if pkg is None:
                if hf_path is None:
                    hf_dir = scratch / "hf-model"
                    hf_dir.mkdir()
                    prepare_hf_folder(model, loader_pkg, dtype, args.seed, hf_dir)
                    hf_path = str(hf_dir)
                spec.update(kind="hf", hf_path=hf_path, hf_batch_size=args.max_batch_size)
            else:
                spec.update(kind="stage")
            result = run_worker(spec, scratch, name)
            if "error" in result:
                print(f"error: row {name} failed: {result['error']}", file=sys.stderr)
                note = f"FAILED: {result['error']}"
            else:
                note = result["note"]
                gpu = gpu or result.get("gpu")
            rows.append({"milestone": name, "note": note, "summary": summarize(result),
                         "samples": result.get("samples", [])})

    first = rows[0]["summary"]["output_tokens_per_s"]
    for row in rows:
        s = row["summary"]
        if s["output_tokens_per_s"] is not None and first:
            s["throughput_ratio"] = s["output_tokens_per_s"] / first
        if roofline is not None and s["total_time_s"]:
            s["roofline_fraction"] = roofline["time_s"] / s["total_time_s"]

    results = {
        "command": shlex.join(["python", "bench/compare.py", *sys.argv[1:]]),
        "git_commit": _git_commit(),
        "workload": args.workload, "model": args.model, "device": device,
        "date": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"gpu": gpu, "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                    "hostname": socket.gethostname()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": _version("transformers"), "triton": _version("triton"),
                     "git_commit": _git_commit()},
        "config": {"num_prompts": wl.num_prompts, "seed": args.seed,
                   "input_len": wl.input_len, "output_len": wl.output_len,
                   "request_rate": wl.request_rate,
                   "prefix_len": wl.prefix_len or None, "threads": args.threads,
                   "engine": {k: v for k, v in engine.items() if k not in ("model", "device")}},
        "roofline": roofline,
        "rows": rows,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{args.workload}-{model_slug(args.model)}-{device}-{start.strftime('%Y%m%d-%H%M%S')}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(report.plain_table(results))
    print(f"\nresults: {json_path}")
    if not args.no_plot:
        png = plot(results, out_dir / f"{stem}.png")
        if png is not None:
            print(f"plot:    {png}")
    return 1 if any(r["note"].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
