"""Compare the stages (and transformers) on one workload: `python bench/compare.py`.

Introduced with the bench (M1). Each milestone runs in its own process (`bench/worker.py`)
on the identical workload: the same token-id prompts, lengths, arrival times and seed,
greedy, `ignore_eos` so every request produces exactly its output length.

    python bench/compare.py --milestones m1,m2,m3        # a few minutes on a laptop CPU
    python bench/compare.py --milestones m1,m2,m3,hf --workload latency --repeat 3
    python bench/compare.py --milestones m1,m2,m3 --workload throughput \\
        --model dummy:qwen2.5-0.5b --device cuda --num-prompts 64 --publish
    python bench/compare.py --milestones m5,m6,hf --workload chat --turns 4 --turn-len 64
    python bench/compare.py --milestones m7,m7:quantization=gptq --workload throughput \\
        --model dummy:llama-3.1-8b --device cuda --num-prompts 128 --gpu-memory-gib 24

The default workload, `concurrent`, is 16 requests arriving at once (bench/workloads.py):
where the stages differ (M1 serves them one after another, M2 and M3 batch them).
Before the rows run it prints an estimate of the run time, from the newest earlier
results file of the same model and device (each row's seconds per output token there,
times this run's output tokens), and warns when it is over 10 minutes. After the table
it prints why the rows differ: how many sequences each ran at once and what limited it
(bench/report.py). `--repeat N` runs each row N times, each in a fresh process, rounds
interleaved (m1, m2, m3, m1, m2, ...); the summary is the median of each metric.

Results go to bench/scratch/ (gitignored) as <workload>-<model>-<device>-<date>.json with
a PNG plot of the same name; `--publish` writes them to bench/results/ (committed, shown
by the docs) instead, and only from a clean tree at a known commit (it refuses otherwise),
and `--out-dir` overrides both (the environment variables
FOLOVLLM_BENCH_SCRATCH and FOLOVLLM_BENCH_RESULTS move the two folders, for tests).

A file holds: command (the exact argv), git_commit and git_dirty (FOLOVLLM_GIT_COMMIT and
FOLOVLLM_GIT_DIRTY=0/1 name them for a copy of the tree whose .git is stale, e.g. on the
GPU machine), published, workload, model, device, date (UTC), machine (gpu, cpu,
cpu_count, hostname; gpu_memory_bytes, the card's total, on CUDA), versions (python, torch,
transformers, triton, numpy), config (workload and engine settings, repeat, gpu_memory_gib
(the --gpu-memory-gib budget or null); num_prompts counts requests, for chat conversations
x turns; chat also sets conversations, turns, turn_len ([low, high] of a later turn's user
message), turn_prompt_lens and turn_output_lens (per conversation, each turn's whole
prompt and output length), null for the other workloads), roofline (null off CUDA), and
one row per milestone: its name (`milestone`, the spec as given), overrides (its own EngineConfig
settings, {} for none; not on the hf row), note (how it ran the workload), wall_s (the
row's processes, load included), summary (ttft/tpot in ms, e2e in s, tokens/s,
requests/s, total time, peak MiB, max_concurrent_seqs, throughput ratio, roofline
fraction, kv_cache, the inter-token latency, the prefix cache's prefix_cache_queries,
prefix_cache_hits and prefix_cache_hit_rate (prompt tokens looked up at admission, found
cached, and hits / queries, for the timed requests; null for a stage without a prefix
cache), runs, and spread: {metric: [min, max]} over the runs, null for one run), repeats
(each run's summary, when more than one) and the first run's per-request samples
(prompt_len, output_len, ttft_s, tpot_s, e2e_s, itl_mean_s / itl_max_s; num_cached_tokens
from a stage with a prefix cache; conversation and turn on chat). Older files may lack
some of these keys; bench/report.py reads them all.

Inter-token latency (ITL): the time between two consecutive output tokens of one request
(the first token's time is its TTFT, not a gap). The summary pools the gaps of all
requests: itl_mean_ms, itl_p50_ms, itl_p99_ms, itl_max_ms, itl_quantiles_ms (the 0th to
100th percentiles, 101 values, for a CDF: `python -m bench.report --itl-cdf FILE.json`)
and itl_gaps (how many gaps). The gaps themselves are not stored. They are null for a row
that could not time each token. Over repeated runs: the median of each, element by
element for the quantiles.

`--gpu-memory-gib G` (CUDA) gives every stage row the same memory budget: its
gpu_memory_utilization is G GiB over the card's total memory (measured in a worker, with
the roofline), so the KV cache gets what that row's weights, activations and CUDA graphs
leave of G GiB: bf16 and GPTQ rows then hold different numbers of KV tokens, and the
table adds the KV cache's size, tokens and the most sequences each row ran at once.

Milestones: m1..m7 are the stage packages present in this checkout (m0 cannot generate);
`hf` is transformers `generate` on the same weights (for dummy models, the stage's dummy
weights are saved to a temporary Hugging Face folder first). `NAME:KEY=VALUE[:KEY=VALUE]`
runs stage NAME with those EngineConfig settings on top of the common ones (VALUE read as
--engine-arg reads it), so one file can compare a stage with its idea on and off:

    python bench/compare.py --milestones m4,m5,m5:enable_chunked_prefill=false
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
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the stages and `bench` importable
    sys.path.insert(0, str(REPO))

from bench import report, stages  # noqa: E402
from bench.workloads import WORKLOADS, build_workload  # noqa: E402

STAGES = {s.short: s.package for s in stages.ALL_STAGES}  # "m1" -> "m1_basic" (bench/stages.py)
PEERS = ("hf",)
LOUD_ESTIMATE_S = 600  # an estimate above this is printed as a warning
BUDGET_KEYS = ("gpu_memory_utilization", "kv_cache_memory")  # what --gpu-memory-gib sets
_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6,
          "g": 10 ** 9, "gb": 10 ** 9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30,
          "t": 10 ** 12, "tb": 10 ** 12, "tib": 2 ** 40}


def results_dir() -> Path:
    """The published results (committed, read by the docs): bench/results/."""
    return Path(os.environ.get("FOLOVLLM_BENCH_RESULTS") or REPO / "bench" / "results")


def scratch_dir() -> Path:
    """Local runs (gitignored): bench/scratch/."""
    return Path(os.environ.get("FOLOVLLM_BENCH_SCRATCH") or REPO / "bench" / "scratch")


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


def parse_gib(text: str) -> float:
    """'24' or '7.5' -> GiB, > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if not 0 < value < float("inf"):
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
                    "each in its own process; print a run-time estimate, one comparison "
                    "table and why the rows differ. The results JSON and a PNG plot go to "
                    "bench/scratch/ (or bench/results/ with --publish).",
        epilog="Workloads: concurrent (the default: 16 prompts all at t=0, lengths uniform "
               "in [32, 128]; a few minutes for m1,m2,m3 on a laptop CPU), latency (one "
               "request at a time; 4 prompts, 128 in / 128 out), throughput (all at t=0; "
               "256 prompts, lengths uniform in [100, 1024]; hours for m1 on a CPU), online "
               "(Poisson arrivals; 64 prompts, 128/128, 4 req/s), prefix (512-token shared "
               "prefix + 32-token questions, 64 out; 32 prompts), chat (multi-turn: "
               "--num-prompts conversations (16) of --turns turns (4), all starting at t=0; "
               "a turn is sent when the one before it has finished, its prompt the previous "
               "turn's prompt + the reply the row generated + a new --turn-len user message "
               "(64); the first prompt is --input-len (256), every turn generates "
               "--output-len (128); the hf row runs it too, in static batches of the turns "
               "ready when its previous batch ends).")
    p.add_argument("--milestones", required=True,
                   help="comma-separated rows: m1..m7 (the stages present) and hf "
                        "(transformers), e.g. m1,m2,m3; a stage row may change its own "
                        "EngineConfig settings as NAME:KEY=VALUE[:KEY=VALUE...] (VALUE "
                        "read as --engine-arg reads it), e.g. "
                        "m4,m5,m5:enable_chunked_prefill=false; the row is named by the "
                        "whole spec")
    p.add_argument("--workload", default="concurrent", choices=WORKLOADS,
                   help="(default: concurrent)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run each row N times, each in a fresh process; the table shows "
                        "medians and the min-max of output tok/s (default 1)")
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), dummy:NAME, or a local HF folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when torch sees a GPU, else cpu")
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU (every row uses the same)")
    p.add_argument("--num-prompts", type=int,
                   help="default: depends on the workload (chat: the number of "
                        "conversations)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the prompts, lengths, arrivals and dummy weights")
    p.add_argument("--request-rate", type=float,
                   help="online workload: requests per second (default 4)")
    p.add_argument("--input-len", type=parse_length, metavar="N|LO:HI",
                   help="prompt length, fixed or uniform in [LO, HI] (prefix workload: "
                        "the question length; chat: the first turn's prompt)")
    p.add_argument("--output-len", type=parse_length, metavar="N|LO:HI",
                   help="output length, fixed or uniform in [LO, HI]")
    p.add_argument("--prefix-len", type=int, help="prefix workload: shared prefix (512)")
    p.add_argument("--turns", type=int, metavar="N",
                   help="chat workload: turns per conversation (4); the first turn's prompt "
                        "is --input-len tokens, each later one adds the reply and a user "
                        "message")
    p.add_argument("--turn-len", type=parse_length, metavar="N|LO:HI",
                   help="chat workload: the user message each later turn adds, fixed or "
                        "uniform in [LO, HI] (64)")
    p.add_argument("--max-model-len", type=int,
                   help="engine max_model_len (default: the model's limit, capped at 4096)")
    p.add_argument("--max-batch-size", type=int,
                   help="engine max_batch_size (stages that have it), hf batch size, and "
                        "the roofline schedule's batch bound (default: all prompts)")
    p.add_argument("--kv-cache-memory", type=parse_bytes,
                   help="engine kv_cache_memory budget (stages that have it): bytes or "
                        "e.g. 2GiB")
    p.add_argument("--gpu-memory-gib", type=parse_gib, metavar="G",
                   help="CUDA only: a memory budget of G GiB for every stage row "
                        "(gpu_memory_utilization = G GiB / the card's total memory), so "
                        "each row's KV cache is what its weights leave of the same G GiB; "
                        "not with --kv-cache-memory or a gpu_memory_utilization or "
                        "kv_cache_memory setting")
    p.add_argument("--engine-arg", type=parse_engine_arg, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="any other EngineConfig field, e.g. block_size=16 (repeatable); "
                        "stages without that field ignore it and say so")
    p.add_argument("--threads", type=int,
                   help="CPU: torch threads in every worker (default: torch's default)")
    p.add_argument("--publish", action="store_true",
                   help="write to bench/results/ (committed, shown by the docs) instead of "
                        "the gitignored bench/scratch/")
    p.add_argument("--out-dir",
                   help="where the results JSON and PNG go (default bench/scratch/, or "
                        "bench/results/ with --publish)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


class Milestone(NamedTuple):
    """One row to run: its name (the spec as given), the stage package (None for hf) and
    the EngineConfig settings it changes."""
    name: str
    package: str | None
    overrides: dict

    @property
    def stage(self) -> str:
        """The stage or peer it runs: "m5" for "m5:enable_chunked_prefill=false"."""
        return base_name(self.name)


def base_name(name: str) -> str:
    """The stage (or peer) of a row name: the part before the first ':'."""
    return name.partition(":")[0]


def parse_overrides(spec: str) -> tuple[str, dict]:
    """'m5:enable_chunked_prefill=false:block_size=32' -> ('m5', {...}); BenchError for
    a spec that does not parse. Each VALUE is read as --engine-arg reads it."""
    name, *parts = spec.split(":")
    overrides: dict = {}
    for part in parts:
        try:
            key, value = parse_engine_arg(part)
        except argparse.ArgumentTypeError:
            raise BenchError(f"milestone {spec!r}: {part!r} is not KEY=VALUE (use "
                             "NAME:KEY=VALUE[:KEY=VALUE...], e.g. "
                             "m5:enable_chunked_prefill=false)") from None
        if key in overrides:
            raise BenchError(f"milestone {spec!r}: {key} is set twice")
        overrides[key] = value
    return name, overrides


def check_overrides(spec: str, name: str, package: str, overrides: dict) -> None:
    """BenchError unless the stage's EngineConfig has every key and takes the values."""
    import dataclasses

    config = importlib.import_module(f"{package}.config").EngineConfig
    fields = [f.name for f in dataclasses.fields(config)]
    unknown = [key for key in overrides if key not in fields]
    if unknown:
        raise BenchError(f"milestone {spec!r}: {name} ({package}) has no EngineConfig "
                         f"setting {', '.join(unknown)}; it has {', '.join(fields)}")
    try:
        config(**overrides)
    except (TypeError, ValueError) as exc:
        raise BenchError(f"milestone {spec!r}: {name}'s EngineConfig rejects it: "
                         f"{exc}") from None


def resolve_milestones(text: str) -> list[Milestone]:
    """'m1,hf,m3:block_size=32' -> [Milestone('m1', 'm1_basic', {}), Milestone('hf',
    None, {}), Milestone('m3:block_size=32', 'm3_paged_kv', {'block_size': 32})];
    BenchError for a bad name, a bad spec, an unknown setting or a row listed twice."""
    specs = [n.strip() for n in text.split(",") if n.strip()]
    if not specs:
        raise BenchError("--milestones: give at least one, e.g. m1,hf")
    present = [m for m, pkg in STAGES.items() if "generate" in stages.get(m).features
               and (REPO / pkg / "engine" / "llm_engine.py").is_file()]
    choices = ", ".join(present + list(PEERS))
    out: list[Milestone] = []
    seen: list[tuple[str, dict]] = []
    for spec in specs:
        name, overrides = parse_overrides(spec)
        name = name.lower()
        spec = name + spec[len(name):]  # "M5:..." is "m5:..."
        if (name, overrides) in seen:
            raise BenchError(f"milestone {spec!r} is listed twice")
        seen.append((name, overrides))
        if name in PEERS:
            if overrides:
                raise BenchError(f"milestone {spec!r}: {name} has no EngineConfig to "
                                 "change; settings go after a stage name, e.g. "
                                 "m5:enable_chunked_prefill=false")
            out.append(Milestone(name, None, {}))
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
            if overrides:
                check_overrides(spec, name, pkg, overrides)
            out.append(Milestone(spec, pkg, overrides))
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


def _at(ordered: list[float], q: float) -> float:
    """The q-th percentile of sorted values, interpolated between the closest ranks."""
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default)."""
    return _at(sorted(values), q) if values else None


ITL_KEYS = ["itl_mean_ms", "itl_p50_ms", "itl_p99_ms", "itl_max_ms", "itl_quantiles_ms",
            "itl_gaps"]
PREFIX_CACHE_KEYS = ["prefix_cache_queries", "prefix_cache_hits", "prefix_cache_hit_rate"]
SUMMARY_KEYS = ["ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms", "tpot_mean_ms", "tpot_p50_ms",
                "tpot_p99_ms", "e2e_mean_s", "e2e_p50_s", "e2e_p99_s", "output_tokens_per_s",
                "requests_per_s", "total_time_s", "peak_memory_mib", "max_concurrent_seqs",
                "throughput_ratio", "roofline_fraction", "kv_cache", "weights", *ITL_KEYS,
                *PREFIX_CACHE_KEYS]


def itl_gaps(times: list[float] | None) -> list[float] | None:
    """One request's inter-token gaps (seconds) from its token times: n tokens, n - 1
    gaps (the first token's time is its TTFT, not a gap). None stays None (untimed)."""
    if times is None:
        return None
    return [b - a for a, b in zip(times, times[1:])]


def itl_summary(token_times: list[list[float] | None] | None) -> dict:
    """The ITL keys of a run's summary, the gaps of all requests pooled: mean, p50, p99
    and max in ms, the 0th..100th percentiles (101 values) and how many gaps. All None
    when a request was not timed token by token, or when no request had two tokens."""
    summary = dict.fromkeys(ITL_KEYS)
    gaps = [itl_gaps(times) for times in token_times or [None]]
    if any(g is None for g in gaps):
        return summary
    pooled = sorted(1e3 * gap for g in gaps for gap in g)
    summary["itl_gaps"] = len(pooled)
    if not pooled:
        return summary
    summary.update(itl_mean_ms=sum(pooled) / len(pooled), itl_p50_ms=_at(pooled, 50),
                   itl_p99_ms=_at(pooled, 99), itl_max_ms=pooled[-1],
                   itl_quantiles_ms=[_at(pooled, q) for q in range(101)])
    return summary


def itl_per_request(times: list[float] | None) -> dict:
    """A sample's own ITL (seconds): the mean and the largest of its gaps, None without."""
    gaps = itl_gaps(times)
    if not gaps:
        return {"itl_mean_s": None, "itl_max_s": None}
    return {"itl_mean_s": sum(gaps) / len(gaps), "itl_max_s": max(gaps)}


def summarize(result: dict) -> dict:
    """The summary of one run from a worker's result (or all-null for a failed run)."""
    summary = dict.fromkeys(SUMMARY_KEYS)
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
    summary["max_concurrent_seqs"] = result.get("max_concurrent_seqs")
    summary["kv_cache"] = result.get("kv_cache")
    summary["weights"] = result.get("weights")
    summary.update(itl_summary(result.get("token_times_s")))
    summary.update(prefix_cache_summary(result.get("kv_cache")))
    return summary


def prefix_cache_summary(kv: dict | None) -> dict:
    """The prefix-cache keys of a run's summary, from its KV stats (None for a stage
    without a prefix cache; the hit rate None when nothing was looked up)."""
    return {key: (kv or {}).get(key) for key in PREFIX_CACHE_KEYS}


def _median_curve(curves: list) -> list[float] | None:
    """The element-wise median of equally long lists (still sorted if each one is); None
    unless every run has one."""
    if not curves or any(not isinstance(c, list) or len(c) != len(curves[0]) for c in curves):
        return None
    return [statistics.median(values) for values in zip(*curves)]


def combine_runs(summaries: list[dict]) -> dict:
    """One row's summary over its runs: the median of each number, the first run's KV
    stats, the element-wise median of the ITL quantiles, `runs`, and `spread` ({metric:
    [min, max]}, None for a single run)."""
    combined = dict(summaries[0])
    spread = {}
    if len(summaries) > 1:
        combined["itl_quantiles_ms"] = _median_curve([s.get("itl_quantiles_ms")
                                                      for s in summaries])
    for key in SUMMARY_KEYS:
        values = [s[key] for s in summaries if isinstance(s.get(key), (int, float))]
        if key in ("kv_cache", "weights") or len(values) < len(summaries):
            continue
        whole = all(isinstance(v, int) for v in values)  # counts stay counts
        combined[key] = (statistics.median_low if whole else statistics.median)(values)
        spread[key] = [min(values), max(values)]
    combined["runs"] = len(summaries)
    combined["spread"] = spread if len(summaries) > 1 else None
    return combined


def git_info() -> tuple[str | None, bool | None]:
    """(HEAD, whether tracked files differ from it). FOLOVLLM_GIT_COMMIT and
    FOLOVLLM_GIT_DIRTY=0/1 name them for a copy of the tree whose .git is stale or absent
    (the GPU machine's); a commit given that way without FOLOVLLM_GIT_DIRTY has an unknown
    (None) dirty flag, unless it ends in "-dirty"."""
    commit, dirty = os.environ.get("FOLOVLLM_GIT_COMMIT"), os.environ.get("FOLOVLLM_GIT_DIRTY")
    flag = {"0": False, "1": True}.get((dirty or "").strip())
    if commit:
        if commit.endswith("-dirty"):
            commit, flag = commit[:-len("-dirty")], True if flag is None else flag
        return commit, flag
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None, flag
        if flag is None:
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=REPO, capture_output=True, text=True, timeout=10)
            flag = bool(status.stdout.strip()) if status.returncode == 0 else None
        return head.stdout.strip(), flag
    except (OSError, subprocess.SubprocessError):
        return None, flag


# -- the estimate ----------------------------------------------------------------------
def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def earlier_results(model: str, device: str, dtype: str, workload: str,
                    folders: list[Path]) -> tuple[Path, dict] | None:
    """The newest results file of this model, device and dtype in `folders`, preferring
    one of the same workload."""
    best = None
    seen = set()
    for folder in folders:
        for path in report.latest_results(results_dir=folder) if folder.is_dir() else []:
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            results = report.load_results(path)
            file_dtype = ((results.get("config") or {}).get("engine") or {}).get("dtype")
            if (results.get("model"), results.get("device")) != (model, device) or (
                    file_dtype not in (None, dtype)):
                continue
            key = (results.get("workload") == workload, results.get("date") or "")
            if best is None or key > best[0]:
                best = (key, path, results)
    return None if best is None else (best[1], best[2])


def runs_one_at_a_time(name: str, sequential: bool, hf_batch: int | None) -> bool:
    """Known before the run: the latency workload, a stage without batching, hf batch 1.
    `name` may be a row with settings ("m5:enable_chunked_prefill=false")."""
    if sequential:
        return True
    if base_name(name) in PEERS:
        return hf_batch == 1
    return "batching" not in stages.get(base_name(name)).features


def _row_seconds(row: dict | None, out_tokens: int) -> float | None:
    """One run of a row with `out_tokens` output tokens, at the rate that row had: its
    seconds per output token, plus its start-up (load and warm-up) when recorded."""
    s = (row or {}).get("summary") or {}
    if not s.get("output_tokens_per_s"):
        return None
    start_up = 0.0
    if row.get("wall_s") and s.get("total_time_s"):
        start_up = max(0.0, row["wall_s"] / (s.get("runs") or 1) - s["total_time_s"])
    return out_tokens / s["output_tokens_per_s"] + start_up


def estimate_lines(names: list[str], workload: str, out_tokens: int, repeat: int,
                   earlier: tuple[Path, dict] | None, one_at_a_time: list[str]) -> list[str]:
    """What will run and, from an earlier results file, about how long it takes."""
    what = (f"each row: {out_tokens} output tokens" + (f", {repeat} runs" if repeat > 1 else "")
            + f"; one request at a time: {', '.join(one_at_a_time) or 'none'}")
    if earlier is None:
        return ["estimate: no earlier results file of this model and device to estimate "
                f"from; {what}"]
    path, results = earlier
    rows = {row["milestone"]: row for row in results.get("rows", [])}
    parts, missing, total = [], [], 0.0
    for name in names:  # a row with settings: its own earlier row, else its stage's
        seconds = _row_seconds(rows.get(name, rows.get(base_name(name))), out_tokens)
        if seconds is None:
            missing.append(name)
            continue
        total += repeat * seconds
        parts.append(f"{name} ~{fmt_duration(repeat * seconds)}")
    rough = "" if results.get("workload") == workload else (
        f", a {results.get('workload')} run: rough")
    out = [f"estimate: ~{fmt_duration(total)} for {', '.join(parts) or 'no row'} "
           f"(from {path.name}{rough})", f"  {what}"]
    if missing:
        out.append(f"  {', '.join(missing)}: not in {path.name}, so not in the estimate")
    if total > LOUD_ESTIMATE_S:
        out.append(f"WARNING: this run should take about {fmt_duration(total)}, over 10 "
                   "minutes. Ctrl-C stops it; fewer --num-prompts, a shorter --output-len or "
                   "the default concurrent workload make it shorter.")
    return out


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def prepare_hf_folder(model: str, package: str, dtype: str, seed: int, folder: Path) -> None:
    """Save a stage's dummy weights (and a transformers config) as a Hugging Face folder.

    The tensors go by the checkpoint's names (`checkpoint_layout` from M4 on, where q/k/v
    and gate/up are merged layers; before it, the parameters' names are those names)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    loader = importlib.import_module(f"{package}.model_executor.model_loader")
    name = model[len("dummy:"):]
    mc = loader.load_model_config(model)
    net = loader.load_model(model, mc, getattr(torch, dtype), torch.device("cpu"), seed=seed)
    # either lists a tied lm_head once, under the embedding's name
    layout = getattr(loader, "checkpoint_layout", None)
    named = layout(net).items() if layout else net.named_parameters()
    tensors = {n: p.detach().contiguous() for n, p in named}
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


def _time_panel(values: list, label: str) -> tuple[list, str]:
    """ms values, shown in seconds when the largest is 10 s or more."""
    if max((v or 0) for v in values) >= 10_000:
        return [None if v is None else v / 1000 for v in values], f"{label} (s)"
    return values, f"{label} (ms)"


def plot_panels(results: dict) -> list[tuple[list, str]]:
    """(one value per row, title) for each panel: throughput, TTFT, TPOT, ITL p99 (only
    when some row has it: older files do not) and, last, sequences at once."""
    summaries = [row.get("summary") or {} for row in results["rows"]]
    ttft, ttft_label = _time_panel([s.get("ttft_p50_ms") for s in summaries], "TTFT p50")
    tpot, tpot_label = _time_panel([s.get("tpot_p50_ms") for s in summaries], "TPOT p50")
    panels = [([s.get("output_tokens_per_s") for s in summaries],
               "output tokens/s\n(higher is better)"),
              (ttft, f"{ttft_label}\n(lower is better)"),
              (tpot, f"{tpot_label}\n(lower is better)")]
    itl = [s.get("itl_p99_ms") for s in summaries]
    if any(v is not None for v in itl):
        itl, itl_label = _time_panel(itl, "ITL p99")
        panels.append((itl, f"{itl_label}\n(lower is better)"))
    return panels + [([report.at_once(results, row) for row in results["rows"]],
                      "sequences at once\n(more = more batching)")]


def plot(results: dict, path: Path) -> Path | None:
    """Bar charts of throughput, TTFT, TPOT, ITL p99 (when the file has it) and sequences
    at once, one bar per row; a row that ran one request at a time is hatched. Four
    panels in a 2 x 2 grid (five in 3 x 2), 900 px wide, so the text stays readable in a
    docs page's column. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("warning: matplotlib is not installed; no plot written", file=sys.stderr)
        return None
    names = [row["milestone"] for row in results["rows"]]
    summaries = [row.get("summary") or {} for row in results["rows"]]
    panels = plot_panels(results)
    at_once = panels[-1][0]
    spread = [(s.get("spread") or {}).get("output_tokens_per_s") for s in summaries]
    colors = report.COLORS
    grid = (len(panels) + 1) // 2
    fig, axes = plt.subplots(grid, 2, figsize=(9, 6.4 if grid == 2 else 8.8))
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    # the room under a bar, in characters of the smaller tick font: a panel is ~260 pt wide
    labels, key = report.bar_labels(names, fit=int(260 / len(names) / (0.6 * 8)))
    small = max(len(line) for n in labels for line in n.split("\n")) > 12
    for index, (ax, (values, label)) in enumerate(zip(axes.flat, panels)):
        bars = ax.bar(range(len(labels)), [v or 0 for v in values], tick_label=labels,
                      color=[colors[i % len(colors)] for i in range(len(names))],
                      hatch=["//" if n == 1 else "" for n in at_once], edgecolor="white")
        if index == 0 and any(spread):
            centers = [b.get_x() + b.get_width() / 2 for b in bars]
            for x, v, lh in zip(centers, values, spread):
                if lh and v is not None:
                    low, high = max(0, v - lh[0]), max(0, lh[1] - v)
                    ax.errorbar(x, v, yerr=[[low], [high]], color="black", capsize=3,
                                linewidth=1)
        for bar, v, lh in zip(bars, values, spread if index == 0 else [None] * len(bars)):
            counts = values is at_once
            text = report.at_once_text(v).split()[0] if counts else report.fmt_number(v)
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2,
                               lh[1] if lh else bar.get_height()),
                        ha="center", va="bottom", fontsize=10 if len(names) <= 6 else 8)
        ax.set_title(label, fontsize=11)
        ax.tick_params(labelsize=10)
        if small:  # long row names (rows with settings) share the width
            ax.tick_params(axis="x", labelsize=8)
        if values is at_once:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.margins(y=0.18)
    runs = (results.get("config") or {}).get("repeat") or 1
    legend = "; ".join((["hatched: one request at a time"] if 1 in at_once else [])
                       + ([f"error bars: min-max of the {runs} runs"] if runs > 1 else [])
                       + ([key] if key else []))
    title = [report.caption(results).replace("`", "")] + ([legend] if legend else [])
    fig.suptitle("\n".join(textwrap.fill(line, 100) for line in title), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the running worker is stopped
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _run(args, argv)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("num_prompts", "max_model_len", "max_batch_size", "prefix_len", "threads",
                 "repeat", "turns"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    if args.request_rate is not None and args.workload != "online":
        raise BenchError("--request-rate applies to the online workload only")
    if args.prefix_len is not None and args.workload != "prefix":
        raise BenchError("--prefix-len applies to the prefix workload only")
    for flag, value in (("--turns", args.turns), ("--turn-len", args.turn_len)):
        if value is not None and args.workload != "chat":
            raise BenchError(f"{flag} applies to the chat workload only (multi-turn "
                             "conversations: --workload chat)")
    if args.gpu_memory_gib is not None:
        taken = (["--kv-cache-memory"] if args.kv_cache_memory is not None else []) + [
            f"--engine-arg {key}" for key, _ in args.engine_arg if key in BUDGET_KEYS]
        if taken:
            raise BenchError(f"--gpu-memory-gib sets each row's gpu_memory_utilization from "
                             f"the budget; leave out {' and '.join(taken)}")
    if args.publish:
        check_publishable()


def check_budget_rows(gib: float | None, milestones: list["Milestone"]) -> None:
    """BenchError for a row that sets its own memory while --gpu-memory-gib is given."""
    if gib is None:
        return
    for m in milestones:
        own = [key for key in m.overrides if key in BUDGET_KEYS]
        if own:
            raise BenchError(f"milestone {m.name!r} sets {', '.join(own)}, but "
                             f"--gpu-memory-gib {gib:g} gives every row the same budget")


def budget_utilization(gib: float, total_bytes: int) -> float:
    """gpu_memory_utilization for a budget of `gib` GiB on a card of `total_bytes`."""
    if gib * 2**30 > total_bytes:
        raise BenchError(f"--gpu-memory-gib {gib:g}: the card has {total_bytes / 2**30:.1f} "
                         "GiB in all")
    return gib * 2**30 / total_bytes


def check_publishable() -> None:
    """--publish writes what the docs show, so it must name code one can check out: a
    known commit and no uncommitted change to tracked files."""
    commit, dirty = git_info()
    if commit is None:
        raise BenchError("--publish: no git commit is known for this tree (on a copy "
                         "without .git, set FOLOVLLM_GIT_COMMIT and FOLOVLLM_GIT_DIRTY=0/1)")
    if dirty is not False:
        why = "has uncommitted changes" if dirty else "may have uncommitted changes " \
              "(FOLOVLLM_GIT_DIRTY not set)"
        raise BenchError(f"--publish: the tree at {commit[:10]} {why}; commit first so "
                         "the results name code one can check out, or leave out --publish "
                         "(the run goes to the gitignored scratch folder)")


def out_dir_of(args: argparse.Namespace) -> Path:
    """--out-dir, else bench/results/ with --publish, else bench/scratch/."""
    if args.out_dir:
        return Path(args.out_dir)
    return results_dir() if args.publish else scratch_dir()


def measure_roofline(scratch: Path, device: str, dtype: str, mc, wl, max_batch_size):
    """The GPU's name, the workload's roofline (bench/roofline.py) and the card's total
    memory in bytes."""
    import torch
    from bench.roofline import model_cost, simulate

    _say("bench: measuring copy bandwidth and bf16 matmul rate")
    machine = run_worker({"kind": "roofline", "device": device}, scratch, "roofline")
    if "error" in machine:
        raise BenchError(f"cannot measure the GPU: {machine['error']}")
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    bound = 1 if wl.sequential else (max_batch_size or wl.num_prompts)
    sim = simulate(model_cost(mc, itemsize), wl.prompt_lens, wl.output_lens,
                   wl.arrival_times, bound, machine["bandwidth_gbps"] * 1e9,
                   machine["matmul_tflops"] * 1e12, prefix_len=wl.prefix_len,
                   after=[wl.previous(i) for i in range(wl.num_prompts)],
                   cached_lens=wl.cached_lens)
    return machine["gpu"], {"bandwidth_gbps": machine["bandwidth_gbps"],
                            "matmul_tflops": machine["matmul_tflops"],
                            "time_s": sim["time_s"], "bytes": sim["bytes"],
                            "flops": sim["flops"]}, machine.get("total_memory_bytes")


def build_row(milestone: Milestone, runs: list[tuple[dict, float]]) -> dict:
    """A row from its runs (worker result, wall seconds): its overrides, medians, spread,
    the first good run's samples, each with its own ITL mean and max."""
    good = [result for result, _ in runs if "error" not in result]
    errors = [result["error"] for result, _ in runs if "error" in result]
    summaries = [summarize(result) for result in good] or [summarize(runs[0][0])]
    if not good:
        note = f"FAILED: {errors[0]}"
    else:
        note = good[0]["note"]
        if errors:
            note += ("; " if note else "") + (f"{len(errors)} of {len(runs)} runs failed "
                                              f"({errors[0]}); the summary is of the others")
    row: dict = {"milestone": milestone.name}
    if milestone.package is not None:
        row["overrides"] = milestone.overrides
    row.update(note=note, wall_s=sum(wall for _, wall in runs),
               summary=combine_runs(summaries))
    if len(runs) > 1:
        row["repeats"] = summaries
    row["samples"] = []
    if good:
        times = good[0].get("token_times_s") or [None] * len(good[0]["samples"])
        row["samples"] = [dict(sample, **itl_per_request(t))
                          for sample, t in zip(good[0]["samples"], times)]
    return row


class RowsRun(NamedTuple):
    """What run_rows gives back: the rows, the GPU (name, total bytes), the roofline and
    the engine settings the stage rows ran with (--gpu-memory-gib's utilization in)."""
    rows: list[dict]
    gpu: str | None
    gpu_memory_bytes: int | None
    roofline: dict | None
    engine: dict


def run_rows(args, milestones, wl, engine: dict, device: str, dtype: str, mc, model_path,
             loader_pkg: str) -> RowsRun:
    """Every row, --repeat times, rounds interleaved; also the GPU and the roofline."""
    runs: dict[str, list[tuple[dict, float]]] = {m.name: [] for m in milestones}
    gpu, roofline, card_bytes = None, None, None
    total = len(milestones) * args.repeat
    with tempfile.TemporaryDirectory(prefix="folovllm-bench-") as tmp:
        scratch = Path(tmp)
        if device == "cuda":
            gpu, roofline, card_bytes = measure_roofline(scratch, device, dtype, mc, wl,
                                                         args.max_batch_size)
        if args.gpu_memory_gib is not None:
            engine = dict(engine, gpu_memory_utilization=budget_utilization(
                args.gpu_memory_gib, card_bytes))
            _say(f"bench: a budget of {args.gpu_memory_gib:g} GiB of "
                 f"{card_bytes / 2**30:.1f} GiB: gpu_memory_utilization "
                 f"{engine['gpu_memory_utilization']:.4f} for every stage row")
        hf_path = str(model_path) if model_path is not None else None
        for index in range(total):
            milestone = milestones[index % len(milestones)]
            name, pkg = milestone.name, milestone.package
            label = f"{name} ({pkg})" if pkg else f"{name} (transformers)"
            again = f", run {index // len(milestones) + 1} of {args.repeat}" if (
                args.repeat > 1) else ""
            _say(f"bench: [{index + 1}/{total}] {label}{again}")
            spec = {"milestone": name, "package": pkg, "workload": wl.to_dict(),
                    "engine": engine, "device": device, "dtype": dtype,
                    "threads": args.threads, "progress": not args.no_progress}
            if pkg is None:
                if hf_path is None:
                    hf_dir = scratch / "hf-model"
                    hf_dir.mkdir()
                    prepare_hf_folder(engine["model"], loader_pkg, dtype, args.seed, hf_dir)
                    hf_path = str(hf_dir)
                spec.update(kind="hf", hf_path=hf_path, hf_batch_size=args.max_batch_size)
            else:
                spec.update(kind="stage", overrides=milestone.overrides)
            began = time.perf_counter()
            result = run_worker(spec, scratch, f"{name}-{index}")
            runs[name].append((result, time.perf_counter() - began))
            if "error" in result:
                _say(f"error: row {name} failed: {result['error']}")
            else:
                gpu = gpu or result.get("gpu")
    return RowsRun([build_row(m, runs[m.name]) for m in milestones], gpu, card_bytes,
                   roofline, engine)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    _check_args(args)
    milestones = resolve_milestones(args.milestones)
    check_budget_rows(args.gpu_memory_gib, milestones)
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
    if args.gpu_memory_gib is not None and device != "cuda":
        raise BenchError("--gpu-memory-gib is a budget of the GPU's memory (CUDA only); on "
                         "the CPU give the KV cache its bytes with --kv-cache-memory")
    dtype = args.dtype if args.dtype != "auto" else (
        "bfloat16" if device == "cuda" else "float32")
    stage_pkgs = [m.package for m in milestones if m.package is not None]
    loader_pkg = stage_pkgs[0] if stage_pkgs else stages.stages_with("generate")[0]
    loader = importlib.import_module(f"{loader_pkg}.model_executor.model_loader")
    try:
        mc = loader.load_model_config(model)
        model_path = loader.resolve_model_path(model)
        wl = build_workload(args.workload, mc.vocab_size, seed=args.seed,
                            num_prompts=args.num_prompts, input_len=args.input_len,
                            output_len=args.output_len, request_rate=args.request_rate,
                            prefix_len=args.prefix_len, turns=args.turns,
                            turn_len=args.turn_len)
    except ValueError as exc:
        raise BenchError(str(exc)) from exc
    max_len = args.max_model_len or min(mc.max_position_embeddings, 4096)
    longest = max(p + n for p, n in zip(wl.prompt_lens, wl.output_lens))
    if longest > max_len:
        raise BenchError(f"the workload needs up to {longest} tokens per sequence but "
                         f"max_model_len is {max_len}; pass --max-model-len or shorter "
                         "--input-len / --output-len")

    engine = {"model": model, "device": device, "dtype": dtype, "seed": args.seed,
              "max_model_len": args.max_model_len, "max_batch_size": args.max_batch_size,
              "kv_cache_memory": args.kv_cache_memory}
    engine.update(dict(args.engine_arg))
    engine = {k: v for k, v in engine.items() if v is not None}
    start, began = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    commit, dirty = git_info()  # the code as it was when the rows started
    lens = wl.prompt_lens
    names = [m.name for m in milestones]
    _say(f"bench: {args.workload} workload, {requests_text(wl)} (input {min(lens)}.."
         f"{max(lens)}, output {min(wl.output_lens)}..{max(wl.output_lens)} tokens), model "
         f"{args.model}, {device} {dtype}, rows {', '.join(names)}")
    out_dir = out_dir_of(args)
    earlier = earlier_results(args.model, device, dtype, args.workload,
                              [out_dir, results_dir(), scratch_dir()])
    alone = [m for m in names
             if runs_one_at_a_time(m, wl.sequential, args.max_batch_size)]
    for line in estimate_lines(names, args.workload, sum(wl.output_lens), args.repeat,
                               earlier, alone):
        _say(f"bench: {line}" if not line.startswith("WARNING") else line)

    done = run_rows(args, milestones, wl, engine, device, dtype, mc, model_path, loader_pkg)
    rows, gpu, roofline, engine = done.rows, done.gpu, done.roofline, done.engine
    first = rows[0]["summary"]["output_tokens_per_s"]
    for row in rows:
        s = row["summary"]
        if s["output_tokens_per_s"] is not None and first:
            s["throughput_ratio"] = s["output_tokens_per_s"] / first
        if roofline is not None and s["total_time_s"]:
            s["roofline_fraction"] = roofline["time_s"] / s["total_time_s"]

    results = {
        "command": shlex.join(["python", "bench/compare.py", *argv]),
        "git_commit": commit, "git_dirty": dirty, "published": bool(args.publish),
        "workload": args.workload, "model": args.model, "device": device,
        "date": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"gpu": gpu, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                    "hostname": socket.gethostname(),
                    "gpu_memory_bytes": done.gpu_memory_bytes},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": _version("transformers"), "triton": _version("triton"),
                     "numpy": _version("numpy")},
        "config": {"num_prompts": wl.num_prompts, "seed": args.seed,
                   "input_len": wl.input_len, "output_len": wl.output_len,
                   "request_rate": wl.request_rate,
                   "prefix_len": wl.prefix_len or None, **chat_config(wl),
                   "threads": args.threads, "repeat": args.repeat,
                   "gpu_memory_gib": args.gpu_memory_gib,
                   "engine": {k: v for k, v in engine.items() if k not in ("model", "device")}},
        "roofline": roofline,
        "rows": rows,
    }
    write_results(results, args, out_dir, start, time.perf_counter() - began)
    return 1 if any(r["note"].startswith("FAILED") for r in rows) else 0


def requests_text(wl) -> str:
    """"16 prompts"; chat: "4 conversations x 3 turns (12 requests)"."""
    if wl.name != "chat":
        return f"{wl.num_prompts} prompts"
    return (f"{wl.num_conversations} conversations x {wl.turns} turns ({wl.num_prompts} "
            "requests)")


def chat_config(wl) -> dict:
    """The chat keys of a results file's config: the turns and, per conversation, each
    turn's whole prompt and output length (null for the other workloads)."""
    keys = dict.fromkeys(("conversations", "turns", "turn_len", "turn_prompt_lens",
                          "turn_output_lens"))
    if wl.name != "chat":
        return keys
    per_turn = [range(c * wl.turns, (c + 1) * wl.turns) for c in range(wl.num_conversations)]
    lens = wl.prompt_lens
    return dict(conversations=wl.num_conversations, turns=wl.turns, turn_len=wl.turn_len,
                turn_prompt_lens=[[lens[i] for i in turns] for turns in per_turn],
                turn_output_lens=[[wl.output_lens[i] for i in turns] for turns in per_turn])


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def write_results(results: dict, args, out_dir: Path, start, seconds: float) -> None:
    """The JSON (and PNG) files, the table with why the rows differ, where they went."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = (f"{results['workload']}-{model_slug(results['model'])}-{results['device']}-"
            f"{start.strftime('%Y%m%d-%H%M%S')}")
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(report.plain_table(results))
    print(f"\nbench took {fmt_duration(seconds)}")
    print(f"results: {_shown(json_path)}")
    if not args.no_plot:
        png = plot(results, out_dir / f"{stem}.png")
        if png is not None:
            print(f"plot:    {_shown(png)}")
    if args.publish:
        print("published: commit the .json and .png to show them in the docs")
    elif not args.out_dir:
        print("this is a scratch run (gitignored); to publish one, run the same command with "
              "--publish (it writes to bench/results/, which the docs read)")


if __name__ == "__main__":
    sys.exit(main())
