"""Read bench results files and render them: a table (plain text or markdown) and why the
rows differ.

Introduced with the bench (M1). The docs site imports this to show measured tables:

    from bench.report import latest_results, load_results, markdown_table
    path = latest_results(workload="concurrent", milestones=["m1", "m2"])[0]
    print(markdown_table(load_results(path)))

The table keeps to a few columns (it fits 120 terminal columns and a docs page):
milestone, sequences at once, TTFT and TPOT (p50 / p99), output tokens/s (with the
min-max over repeated runs), the ratio to the first row, peak memory and, on CUDA, the
fraction of the roofline. Times print in ms below 10 s and in seconds ("355 s") above.
When a row has a prefix cache (M6), a small table follows: per row, the prompt tokens
looked up in the cache, those found there and the hit rate ("-" for a row without a
prefix cache; older files have none: no table). Another small table gives the
inter-token latency (ITL: mean, p50, p99, max and the number of gaps), when the file has
it (older files do not: no ITL table). A run under a memory budget (`--gpu-memory-gib`)
adds a KV table: per row, its weights, the KV cache it got (MiB and tokens), how many of
the workload's longest sequences that holds, the most sequences it ran at once and its
preemptions.
Below the tables, `why_lines` says for each row how many sequences it ran at once and
why, from the run's own facts (the KV-cache stats, the stage registry in
bench/stages.py), so a new stage gets a line with no change here. Everything else (means,
e2e latency, requests/s, the full KV stats, per-request samples) stays in the JSON.

`plot_itl_cdf` draws each row's ITL distribution from the percentiles the file keeps:

    python -m bench.report --itl-cdf bench/results/FILE.json --out itl.png

The tables of a results file, in a terminal or as markdown:

    python -m bench.report bench/results/FILE.json [--markdown] [--rows m5,m6]

The results file format is described in `bench/compare.py` (one JSON file per run).
"""

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import stages  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WIDTH = 120  # plain text lines stay within this many columns
ITL_STATS = ("mean", "p50", "p99", "max")  # the ITL table's columns, after the name
COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
          "#8c8c8c", "#ccb974"]  # one per row, in the file's order, in every plot


def bar_labels(names: list[str], fit: int) -> tuple[list[str], str]:
    """The labels under a plot's bars, one per row, and a key for them ("" when none is
    needed). A row with settings (`m5:max_num_batched_tokens=4096`) shows its stage over
    its settings when each line fits in `fit` characters (the room under one bar);
    otherwise it shows its stage and a letter, "m5 (a)", and the key spells the settings
    out: "(a) max_num_batched_tokens=4096". Rows with the same settings share a letter."""
    split = [name.split(":", 1) for name in names]
    stacked = [stage + ("\n" + rest[0].replace(":", " ") if rest else "")
               for stage, *rest in split]
    if max(len(line) for label in stacked for line in label.split("\n")) <= fit:
        return stacked, ""
    letters: dict[str, str] = {}
    labels = []
    for stage, *rest in split:
        if not rest:
            labels.append(stage)
            continue
        settings = rest[0].replace(":", " ")
        letter = letters.setdefault(settings, chr(ord("a") + len(letters)))
        labels.append(f"{stage} ({letter})")
    return labels, ", ".join(f"({letter}) {settings}" for settings, letter in letters.items())


def load_results(path: str | Path) -> dict:
    """One results file, as the dict compare.py wrote."""
    return json.loads(Path(path).read_text())


def latest_results(workload: str | None = None, milestones: list[str] | None = None,
                   results_dir: str | Path | None = None) -> list[Path]:
    """Results files, newest first; only those of `workload` and having a row for
    every milestone in `milestones`, when given. Files that do not parse are skipped."""
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    found = []
    for path in folder.glob("*.json"):
        try:
            results = load_results(path)
            rows = {row["milestone"] for row in results["rows"]}
            date = results.get("date") or ""
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if workload is not None and results.get("workload") != workload:
            continue
        if milestones is not None and not set(milestones) <= rows:
            continue
        found.append((date, path.name, path))
    found.sort(reverse=True)
    return [path for _, _, path in found]


def fmt_number(x) -> str:
    """A short human form: 3 significant-ish digits, '-' for a missing value."""
    if x is None:
        return "-"
    x = float(x)
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _pct(x: float) -> str:
    p = 100 * x
    return f"{p:.0f}%" if p >= 9.95 else f"{p:.1f}%" if p >= 0.995 else f"{p:.2f}%"


def kv_text(kv: dict | None) -> str:
    """A short summary of engine.kv_cache_stats(): "max 37 seqs, 61% of 4096 slots".

    The percentage is the peak of token slots holding tokens over the cache's capacity;
    "(N% reserved)" follows when the peak reserved (e.g. in allocated blocks) differs."""
    if not kv:
        return "-"
    parts = []
    if kv.get("max_concurrent_seqs") is not None:
        parts.append(f"max {kv['max_concurrent_seqs']} seqs")
    capacity = kv.get("capacity_token_slots") or kv.get("reserved_token_slots")
    used = kv.get("used_token_slots_peak", kv.get("used_token_slots"))
    reserved = kv.get("reserved_token_slots_peak")
    if capacity and used is not None:
        parts.append(f"{_pct(used / capacity)} of {capacity} slots")
        if reserved is not None and reserved != capacity:
            parts[-1] += f" ({_pct(reserved / capacity)} reserved)"
    elif capacity:
        parts.append(f"{capacity} slots")
    if kv.get("num_preemptions"):
        parts.append(f"{kv['num_preemptions']} preemptions")
    if not parts:  # a stage with other keys: show the first few as they are
        parts = [f"{k}={v}" for k, v in list(kv.items())[:3]]
    return ", ".join(parts)


# -- cells ---------------------------------------------------------------------------
def time_unit(results: dict, name: str, stats: tuple[str, ...] = ("p50", "p99")) -> str:
    """One unit for a whole time column: "s" when any row's value reaches 10 s, else "ms"."""
    values = [(row.get("summary") or {}).get(f"{name}_{q}_ms")
              for row in results["rows"] for q in stats]
    return "s" if any(v is not None and v >= 10_000 for v in values) else "ms"


def row_stage(name: str) -> stages.Stage | None:
    """The stage a row ran ("m5" for "m5:enable_chunked_prefill=false"); None for hf."""
    try:
        return stages.get(name.partition(":")[0])
    except KeyError:
        return None


def fmt_time(ms, unit: str) -> str:
    """A time given in ms, shown in `unit` ("ms" or "s"); '-' when missing."""
    if ms is None:
        return "-"
    return fmt_number(ms / 1000 if unit == "s" else ms)


def _pair(s: dict, name: str, unit: str) -> str:
    return f"{fmt_time(s.get(f'{name}_p50_ms'), unit)}/{fmt_time(s.get(f'{name}_p99_ms'), unit)}"


def at_once(results: dict, row: dict) -> int | None:
    """The most sequences the row ran together; older files: from their KV stats or note."""
    s, note = row.get("summary") or {}, row.get("note") or ""
    if note.startswith("FAILED"):
        return None
    if s.get("max_concurrent_seqs") is not None:
        return s["max_concurrent_seqs"]
    kv = s.get("kv_cache") or {}
    if kv.get("max_concurrent_seqs") is not None:
        return kv["max_concurrent_seqs"]
    if results.get("workload") == "latency" or "one request at a time" in note:
        return 1
    batch = re.search(r"batches of up to (\d+)", note)  # an older file's hf row
    if batch and s.get("output_tokens_per_s") is not None:
        return min(int(batch.group(1)), (results.get("config") or {}).get("num_prompts")
                   or int(batch.group(1)))
    return None


def at_once_text(n: int | None) -> str:
    return "-" if n is None else "1 (one at a time)" if n == 1 else str(n)


def prefix_cache_stats(s: dict) -> tuple[int | None, int | None, float | None]:
    """A summary's prefix-cache (queries, hits, hit rate); from its KV stats when the
    summary lacks the keys; (None, None, None) for a stage without a prefix cache."""
    kv = s.get("kv_cache") or {}
    return tuple(s.get(key, kv.get(key)) for key in
                 ("prefix_cache_queries", "prefix_cache_hits", "prefix_cache_hit_rate"))


def has_prefix_cache(results: dict) -> bool:
    """Whether any row reports prefix-cache lookups (M6 on; older files have none)."""
    return any(prefix_cache_stats(row.get("summary") or {})[0] is not None
               for row in results["rows"])


def hit_rate_text(s: dict) -> str:
    """The prefix cache's hit rate as a percentage; '-' without one."""
    rate = prefix_cache_stats(s)[2]
    return "-" if rate is None else _pct(rate) if rate else "0%"


def _throughput_cell(s: dict) -> str:
    """Output tokens/s; with repeated runs, the min-max after the median."""
    cell = fmt_number(s.get("output_tokens_per_s"))
    low_high = (s.get("spread") or {}).get("output_tokens_per_s")
    if low_high and s.get("output_tokens_per_s") is not None:
        cell += f" ({fmt_number(low_high[0])}-{fmt_number(low_high[1])})"
    return cell


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and one row of cells per milestone (the roofline column on CUDA only).
    Each time column has one unit, seconds once any of its values reaches 10 s."""
    ttft, tpot = time_unit(results, "ttft"), time_unit(results, "tpot")
    headers = ["milestone", "at once", f"TTFT {ttft} p50/p99", f"TPOT {tpot} p50/p99",
               "output tok/s", "vs first", "peak MiB"]
    show_roofline = results.get("roofline") is not None
    if show_roofline:
        headers.append("roofline")
    rows = []
    for row in results["rows"]:
        s = row.get("summary") or {}
        ratio = s.get("throughput_ratio")
        cells = [row["milestone"], at_once_text(at_once(results, row)),
                 _pair(s, "ttft", ttft), _pair(s, "tpot", tpot), _throughput_cell(s),
                 "-" if ratio is None else f"{ratio:.2f}x",
                 fmt_number(s.get("peak_memory_mib"))]
        if show_roofline:
            frac = s.get("roofline_fraction")
            cells.append("-" if frac is None else _pct(frac))
        rows.append(cells)
    return headers, rows


def has_itl(results: dict) -> bool:
    """Whether any row has inter-token latencies (files before them have none)."""
    return any((row.get("summary") or {}).get(f"itl_{q}_ms") is not None
               for row in results["rows"] for q in ITL_STATS)


def itl_table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and one row per milestone of the ITL table: mean, p50, p99 and max in one
    unit (seconds once any reaches 10 s), and the number of gaps pooled."""
    unit = time_unit(results, "itl", ITL_STATS)
    headers = ["milestone"] + [f"ITL {q} {unit}" for q in ITL_STATS] + ["gaps"]
    rows = []
    for row in results["rows"]:
        s = row.get("summary") or {}
        gaps = s.get("itl_gaps")
        rows.append([row["milestone"]] + [fmt_time(s.get(f"itl_{q}_ms"), unit)
                                          for q in ITL_STATS]
                    + ["-" if gaps is None else str(gaps)])
    return headers, rows


def prefix_table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and one row per milestone of the prefix-cache table: prompt tokens looked
    up, found cached, and the hit rate; "-" for a row without a prefix cache."""
    headers = ["milestone", "prompt tokens looked up", "found cached", "hit rate"]
    rows = []
    for row in results["rows"]:
        s = row.get("summary") or {}
        queries, hits, _ = prefix_cache_stats(s)
        rows.append([row["milestone"], "-" if queries is None else str(queries),
                     "-" if hits is None else str(hits), hit_rate_text(s)])
    return headers, rows


def has_quantized_weights(results: dict) -> bool:
    """Whether any row ran GPTQ layers (M7 with quantization)."""
    return any(((row.get("summary") or {}).get("weights") or {}).get("quantized")
               for row in results["rows"])


def weights_table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and one row per milestone: the whole model's weights, and the quantized
    layers' bytes against the same layers unquantized (in the row's dtype)."""
    headers = ["milestone", "weights MiB", "linear layers MiB", "unquantized MiB", "ratio"]
    rows = []
    for row in results["rows"]:
        w = (row.get("summary") or {}).get("weights") or {}
        total, quant, dense = w.get("total"), w.get("quantized"), w.get("dense")
        mib = (lambda b: "-" if b is None else f"{b / 2**20:.1f}")
        rows.append([row["milestone"], mib(total), mib(quant) if quant else "-",
                     mib(dense) if quant else "-",
                     f"{quant / dense:.3f}x" if quant and dense else "-"])
    return headers, rows


def has_memory_budget(results: dict) -> bool:
    """Whether the rows ran under one memory budget (compare.py --gpu-memory-gib)."""
    return bool((results.get("config") or {}).get("gpu_memory_gib"))


def _longest_sequence(row: dict) -> int | None:
    """The longest prompt + output of a row's requests (None without samples)."""
    lens = [s["prompt_len"] + s["output_len"] for s in row.get("samples") or []
            if s.get("prompt_len") is not None and s.get("output_len") is not None]
    return max(lens) if lens else None


def kv_table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and one row per milestone: its weights and the KV cache the budget left it
    (MiB, tokens, and how many sequences of the workload's longest length fit), the most
    sequences it ran at once and its preemptions."""
    headers = ["milestone", "weights MiB", "KV MiB", "KV tokens", "longest fit",
               "max at once", "preemptions"]
    rows = []
    mib = (lambda b: "-" if b is None else f"{b / 2**20:.0f}")
    for row in results["rows"]:
        s = row.get("summary") or {}
        kv, weights = s.get("kv_cache") or {}, s.get("weights") or {}
        tokens, longest = kv.get("capacity_token_slots"), _longest_sequence(row)
        rows.append([row["milestone"], mib(weights.get("total")),
                     mib(kv.get("kv_cache_bytes")), "-" if tokens is None else str(tokens),
                     str(tokens // longest) if tokens is not None and longest else "-",
                     at_once_text(at_once(results, row)).split()[0],
                     str(kv["num_preemptions"]) if "num_preemptions" in kv else "-"])
    return headers, rows


def budget_kv_text(results: dict) -> str:
    """The line over the KV table: what its columns mean under this file's budget."""
    gib = (results.get("config") or {}).get("gpu_memory_gib")
    return (f"KV cache under a memory budget of {gib:g} GiB per row: what each row's "
            "weights, activations and CUDA graphs left for its KV cache, in MiB and in "
            "tokens; how many sequences of the workload's longest length (prompt + "
            "output) those tokens hold; the most sequences the row ran at once; and how "
            "often it preempted one because the cache was full.")


WEIGHTS_TEXT = ("Weights: the whole model's bytes on the device (tied tensors once), and "
                "for GPTQ rows the quantized linear layers (packed codes, zeros, scales, "
                "g_idx) against the same layers unquantized.")

PREFIX_TEXT = ("Prefix cache: the prompt tokens each row looked up in its cache when it "
               "admitted a request, and those it found there (their K/V not computed again).")

ITL_TEXT = ("Inter-token latency (ITL): the time between two consecutive output tokens of "
            "one request, pooled over all requests (the first token's wait is the TTFT).")


def caption(results: dict) -> str:
    """One line naming the run: workload, model, machine, date (and repeated runs)."""
    machine = results.get("machine") or {}
    if machine.get("gpu"):
        where = machine["gpu"]
    else:
        cores = f" ({machine['cpu_count']} cores)" if machine.get("cpu_count") else ""
        where = f"CPU {machine.get('cpu') or 'unknown'}{cores}"
    cfg = results.get("config") or {}
    n = cfg.get("num_prompts")
    date = (results.get("date") or "")[:10]
    runs = cfg.get("repeat") or 1
    median = f"; median of {runs} runs per row" if runs > 1 else ""
    what = f"{n} prompts"
    if cfg.get("turns"):
        what = f"{cfg.get('conversations')} conversations x {cfg['turns']} turns ({n} requests)"
    budget = (f"; a memory budget of {cfg['gpu_memory_gib']:g} GiB per row"
              if has_memory_budget(results) else "")
    return (f"`{results.get('workload')}` workload, {what}, model "
            f"`{results.get('model')}` on {where}, {date}{median}{budget}")


def roofline_text(results: dict) -> str | None:
    r = results.get("roofline")
    if not r:
        return None
    t = r["time_s"]
    when = f"{t:.3g} s" if t >= 1 else f"{t * 1e3:.3g} ms"
    return (f"roofline {when} (copy bandwidth {r['bandwidth_gbps']:.0f} GB/s, bf16 matmul "
            f"{r['matmul_tflops']:.0f} TFLOP/s; {r['bytes'] / 1e9:.3g} GB moved, "
            f"{r['flops'] / 1e12:.3g} TFLOP)")


# -- why the rows differ ---------------------------------------------------------------
def _arrivals(results: dict) -> str:
    cfg = results.get("config") or {}
    n = cfg.get("num_prompts")
    workload = results.get("workload")
    if workload == "latency":
        return f"{n} requests sent one at a time (each after the previous one finished)"
    if workload == "online" and cfg.get("request_rate"):
        return f"{n} requests arriving at random, {cfg['request_rate']:g} per second"
    if cfg.get("turns"):
        return (f"{cfg.get('conversations')} conversations of {cfg['turns']} turns, all "
                "starting at t=0, each turn sent when the one before it finished and "
                "repeating the conversation so far")
    return f"{n} requests, all arriving at t=0"


def why_header(results: dict) -> str:
    """What sets the rows apart: one sequence at a time (latency), the arrival rate (online),
    batching where the rows ran different numbers of sequences at once, or what a step
    costs where they all ran the same number."""
    if results.get("workload") == "latency":
        return (f"Why the rows differ ({_arrivals(results)}): every row runs one sequence at "
                "a time here, so batching cannot help; the rows differ only in what one "
                "step of one sequence costs.")
    cfg = results.get("config") or {}
    if results.get("workload") == "online" and cfg.get("request_rate"):
        return (f"Why the rows differ ({_arrivals(results)}): a row that keeps up produces "
                "tokens as fast as the requests ask for them, so its tokens/s is set by the "
                "arrivals, not by the stage; the rows differ in latency, and a row that "
                "cannot keep up falls behind (fewer tokens/s, TTFT growing as requests queue).")
    counts = {at_once(results, row) for row in results["rows"]} - {None}
    if counts == {1}:
        return (f"Why the rows differ ({_arrivals(results)}): every row ran one sequence at "
                "a time, so batching cannot help; the rows differ only in what one step of "
                "one sequence costs.")
    if len(counts) == 1:
        return (f"Why the rows differ ({_arrivals(results)}): every row ran up to "
                f"{counts.pop()} sequences at once, so batching does not set them apart; "
                "they differ in what a step with that many sequences costs.")
    return (f"Why the rows differ ({_arrivals(results)}): a decode step reads all the weights "
            "once however many sequences it carries, so running more at once gives more "
            "tokens/s (until compute is the limit).")


def prefix_cache_text(s: dict) -> str | None:
    """"prefix cache: 87% of 12000 prompt tokens found cached"; None without one."""
    queries = prefix_cache_stats(s)[0]
    if queries is None:
        return None
    if not queries:
        return "prefix cache: no lookups"
    return f"prefix cache: {hit_rate_text(s)} of {queries} prompt tokens found cached"


def _kv_reason(kv: dict | None, n: int | None, num_prompts: int | None) -> str | None:
    """What the KV cache let the row run at once, from engine.kv_cache_stats()."""
    if not kv:
        return None
    kind = kv.get("kind")
    used, capacity = kv.get("used_token_slots_peak"), kv.get("capacity_token_slots")
    if kind == "contiguous" and kv.get("num_slots") and kv.get("max_model_len"):
        slots = kv["num_slots"]
        text = f"KV reserved whole at max_model_len, {slots} slots x {kv['max_model_len']} tokens"
        if n is not None and n >= slots and (num_prompts or 0) > slots:
            text += " (all in use: the limit)"
        if used is not None and capacity:
            text += f"; {_pct(used / capacity)} of it held tokens at peak"
        return text
    if kind == "paged" and kv.get("block_size"):
        text = f"KV in {kv['block_size']}-token blocks taken as sequences grow"
        peak = kv.get("reserved_token_slots_peak")
        if peak is not None and capacity:
            text += f"; {_pct(peak / capacity)} of {capacity} slots held at peak"
        if kv.get("num_preemptions"):
            text += f"; {kv['num_preemptions']} preemptions (the cache was full)"
        return text
    return f"KV cache: {kv_text(kv)}"


def why_line(results: dict, row: dict) -> str:
    """One line: how many sequences the row ran together, and what made it so (the stage
    registry's title, the KV-cache stats, or what the stage adds when there are none)."""
    name, note = row["milestone"], row.get("note") or ""
    if note.startswith("FAILED"):
        return f"{name}: no numbers, the row failed (see its note)"
    n = at_once(results, row)
    stage = row_stage(name)
    if stage is not None:
        who = f"{stage.label} {stage.title}"
    else:
        who = "transformers generate" if name == "hf" else name
    if n == 1:
        if results.get("workload") == "latency":
            return f"{name}: one request at a time ({who}; the latency workload sends no more)"
        if stage is not None and "batching" not in stage.features:
            return f"{name}: one request at a time ({who}: no batching)"
        return f"{name}: one sequence at a time ({who})"
    head = f"{name}: up to {n} sequences at once" if n is not None else f"{name}: -"
    num_prompts = (results.get("config") or {}).get("num_prompts")
    summary = row.get("summary") or {}
    reason = _kv_reason(summary.get("kv_cache"), n, num_prompts)
    if reason is None and name == "hf":
        reason = "static left-padded batches, each runs until its longest output is done"
    if reason is None and stage is not None:
        reason = stage.adds
    cached = prefix_cache_text(summary)
    if cached:
        reason = f"{reason}; {cached}" if reason else cached
    return f"{head} ({who})" + (f": {reason}" if reason else "")


def why_lines(results: dict) -> list[str]:
    """The why header, then one line per row (unwrapped)."""
    return [why_header(results)] + [why_line(results, row) for row in results["rows"]]


# -- the two renderings ------------------------------------------------------------------
def _markdown_rows(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table: the first column left-aligned, the others right-aligned. A row
    with settings (`m5:enable_chunked_prefill=false`) may wrap after its stage's name."""
    esc = [[(c.replace(":", ": ", 1) if i == 0 else c).replace("|", "\\|")
            for i, c in enumerate(r)] for r in rows]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in esc]


def markdown_table(results: dict) -> str:
    """A caption line, one markdown table (a row per milestone), the prefix-cache and ITL
    tables when the file has them, then why the rows differ, the roofline and the notes
    as a list."""
    lines = [caption(results), "", *_markdown_rows(*table_rows(results))]
    if has_prefix_cache(results):
        lines += ["", PREFIX_TEXT, "", *_markdown_rows(*prefix_table_rows(results))]
    if has_itl(results):
        lines += ["", ITL_TEXT, "", *_markdown_rows(*itl_table_rows(results))]
    if has_quantized_weights(results):
        lines += ["", WEIGHTS_TEXT, "", *_markdown_rows(*weights_table_rows(results))]
    if has_memory_budget(results):
        lines += ["", budget_kv_text(results), "", *_markdown_rows(*kv_table_rows(results))]
    header, *per_row = why_lines(results)
    lines += ["", header, ""]
    for row, why in zip(results["rows"], per_row):
        lines.append(f"- **{row['milestone']}**{why[len(row['milestone']):]}")
    roof = roofline_text(results)
    if roof:
        lines.append(f"- {roof}")
    for row in results["rows"]:
        if row.get("note"):
            lines.append(f"- note **{row['milestone']}**: {row['note']}")
    return "\n".join(lines) + "\n"


def _wrap(text: str, indent: str = "  ") -> list[str]:
    return textwrap.wrap(text, WIDTH, subsequent_indent=indent, break_on_hyphens=False)


def _plain_rows(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A plain text table: the header, a rule, the rows; the first column left-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    gap = 2 if sum(widths) + 2 * (len(widths) - 1) <= WIDTH else 1

    def line(cells):
        return (" " * gap).join(c.ljust(w) if i == 0 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(headers), (" " * gap).join("-" * w for w in widths)] + [line(r) for r in rows]


def plain_table(results: dict) -> str:
    """The same as plain text for a terminal, every line within 120 columns."""
    out = _wrap(caption(results).replace("`", ""))
    out += _plain_rows(*table_rows(results))
    roof = roofline_text(results)
    if roof:
        out += _wrap(roof)
    if has_prefix_cache(results):
        out += [""] + _wrap(PREFIX_TEXT) + _plain_rows(*prefix_table_rows(results))
    if has_itl(results):
        out += [""] + _wrap(ITL_TEXT) + _plain_rows(*itl_table_rows(results))
    if has_quantized_weights(results):
        out += [""] + _wrap(WEIGHTS_TEXT) + _plain_rows(*weights_table_rows(results))
    if has_memory_budget(results):
        out += [""] + _wrap(budget_kv_text(results)) + _plain_rows(*kv_table_rows(results))
    out.append("")
    for text in why_lines(results):
        out += _wrap(text, "    ")
    for row in results["rows"]:
        if row.get("note"):
            out += _wrap(f"note {row['milestone']}: {row['note']}", "    ")
    return "\n".join(out)


# -- the ITL distribution -------------------------------------------------------------
def itl_curves(results: dict) -> list[tuple[str, list[float], int | None]]:
    """(row name, its 101 ITL percentiles in ms, number of gaps) for each row that has
    them, in the file's order."""
    curves = []
    for row in results["rows"]:
        s = row.get("summary") or {}
        quantiles = s.get("itl_quantiles_ms")
        if quantiles:
            curves.append((row["milestone"], quantiles, s.get("itl_gaps")))
    return curves


def plot_itl_cdf(results: dict, path: str | Path, scale: str = "auto") -> Path | None:
    """The ITL CDF of each row (the fraction of gaps at most x ms), drawn from the 0th to
    100th percentiles the file keeps, with the p50 and p99 levels marked; 900 px wide.
    `scale`: "linear", "log" or "auto" (log when the slowest gap is over 20 times a
    typical one: a long tail). ValueError when no row has ITL percentiles; None without
    matplotlib."""
    curves = itl_curves(results)
    if not curves:
        raise ValueError("no row has ITL percentiles (itl_quantiles_ms): the file is older "
                         "than the ITL, or no row timed its tokens one by one")
    if scale not in ("auto", "linear", "log"):
        raise ValueError(f"scale: linear, log or auto, not {scale!r}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed; no plot written", file=sys.stderr)
        return None
    if scale == "auto":
        typical = min(q[50] for _, q, _ in curves)
        slowest = max(q[100] for _, q, _ in curves)
        scale = "log" if typical > 0 and slowest > 20 * typical else "linear"
    levels = [q / 100 for q in range(101)]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    index = {row["milestone"]: i for i, row in enumerate(results["rows"])}
    for name, quantiles, gaps in curves:
        label = name + (f" ({gaps} gaps)" if gaps is not None else "")
        ax.plot(quantiles, levels, linewidth=1.8, label=label,
                color=COLORS[index[name] % len(COLORS)])
    for level, text in ((0.5, "p50"), (0.99, "p99")):
        ax.axhline(level, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(text, (1.0, level), xycoords=("axes fraction", "data"), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=9, color="grey")
    if scale == "log":
        ax.set_xscale("log", nonpositive="mask")  # gaps of 0 (tokens of one step) drop out
    ax.set_xlabel(f"inter-token latency (ms{', log scale' if scale == 'log' else ''})",
                  fontsize=10)
    ax.set_ylabel("fraction of gaps at most x", fontsize=10)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="lower right")
    ax.set_title(caption(results).replace("`", "") + "\nITL CDF (further left is better)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def check_results(results, source: Path) -> dict:
    """The results of bench/compare.py; ValueError for another kind of JSON file (a
    profile, the kernel bench, ...)."""
    rows = results.get("rows") if isinstance(results, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "milestone" in r
                                             for r in rows):
        raise ValueError("not a results file of bench/compare.py (it has no rows of "
                         "milestones: another tool wrote it)")
    return results


def pick_rows(results: dict, names: list[str]) -> dict:
    """The results with only the named rows, in the file's order; ValueError for a name
    the file has no row of."""
    have = [row["milestone"] for row in results["rows"]]
    missing = [name for name in names if name not in have]
    if missing:
        raise ValueError(f"the file has no row {', '.join(missing)} (it has "
                         f"{', '.join(have)})")
    return dict(results, rows=[row for row in results["rows"] if row["milestone"] in names])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="Show a results file of bench/compare.py: its tables as plain text "
                    "(or markdown), or draw the inter-token latency (ITL) CDF of each row "
                    "from the 0th..100th percentiles it keeps (itl_quantiles_ms; files "
                    "written before the ITL have none).")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("results", nargs="?", metavar="RESULTS.json",
                      help="print this file's tables (the comparison, the ITL, why the rows "
                           "differ)")
    what.add_argument("--itl-cdf", metavar="RESULTS.json", help="the results file to draw")
    p.add_argument("--markdown", action="store_true",
                   help="with RESULTS.json: print the tables as markdown (as the docs show "
                        "them)")
    p.add_argument("--out", metavar="PNG",
                   help="where the PNG goes (default: next to the results file, "
                        "NAME-itl-cdf.png)")
    p.add_argument("--rows", metavar="A,B",
                   help="only these rows, e.g. m4,m5,m5:enable_chunked_prefill=false "
                        "(default: every row; for the CDF, every row that has ITL "
                        "percentiles)")
    p.add_argument("--scale", default="auto", choices=["auto", "linear", "log"],
                   help="the x axis; auto: log when the tail is long (default auto)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = Path(args.results or args.itl_cdf)
    written = None
    try:
        results = check_results(load_results(source), source)
        if args.rows:
            results = pick_rows(results, [n for n in args.rows.split(",") if n])
        if args.results:
            text = markdown_table(results) if args.markdown else plain_table(results)
        else:
            out = (Path(args.out) if args.out
                   else source.with_name(f"{source.stem}-itl-cdf.png"))
            written = plot_itl_cdf(results, out, args.scale)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {source}: {exc}", file=sys.stderr)
        return 2
    if args.results:
        print(text)
        return 0
    if written is None:
        return 1
    print(f"plot: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
