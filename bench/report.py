"""Read bench results files and render their tables (plain text and markdown).

Introduced with the bench (M1). The docs site imports this to show measured tables:

    from bench.report import latest_results, load_results, markdown_table
    path = latest_results(workload="throughput", milestones=["m1", "m2"])[0]
    print(markdown_table(load_results(path)))

The results file format is described in `bench/compare.py` (one JSON file per run).
"""

import json
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"

HEADERS = ["milestone", "TTFT ms (mean/p50/p99)", "TPOT ms (mean/p50/p99)",
           "e2e s (mean/p50/p99)", "output tok/s", "req/s", "peak MiB", "KV cache",
           "vs first"]


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


def _triple(s: dict, name: str, unit: str) -> str:
    values = [s.get(f"{name}_{k}_{unit}") for k in ("mean", "p50", "p99")]
    return "/".join(fmt_number(v) for v in values)


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and one row of cells per milestone (the roofline column on CUDA only)."""
    headers = list(HEADERS)
    show_roofline = results.get("roofline") is not None
    if show_roofline:
        headers.append("roofline")
    rows = []
    for row in results["rows"]:
        s = row.get("summary") or {}
        ratio = s.get("throughput_ratio")
        cells = [row["milestone"], _triple(s, "ttft", "ms"), _triple(s, "tpot", "ms"),
                 _triple(s, "e2e", "s"),
                 fmt_number(s.get("output_tokens_per_s")), fmt_number(s.get("requests_per_s")),
                 fmt_number(s.get("peak_memory_mib")), kv_text(s.get("kv_cache")),
                 "-" if ratio is None else f"{ratio:.2f}x"]
        if show_roofline:
            frac = s.get("roofline_fraction")
            cells.append("-" if frac is None else _pct(frac))
        rows.append(cells)
    return headers, rows


def caption(results: dict) -> str:
    """One line naming the run: workload, model, machine, date."""
    machine = results.get("machine") or {}
    if machine.get("gpu"):
        where = machine["gpu"]
    else:
        cores = f" ({machine['cpu_count']} cores)" if machine.get("cpu_count") else ""
        where = f"CPU {machine.get('cpu') or 'unknown'}{cores}"
    cfg = results.get("config") or {}
    n = cfg.get("num_prompts")
    date = (results.get("date") or "")[:10]
    return (f"`{results.get('workload')}` workload, {n} prompts, model "
            f"`{results.get('model')}` on {where}, {date}")


def roofline_text(results: dict) -> str | None:
    r = results.get("roofline")
    if not r:
        return None
    t = r["time_s"]
    when = f"{t:.3g} s" if t >= 1 else f"{t * 1e3:.3g} ms"
    return (f"roofline {when} (copy bandwidth {r['bandwidth_gbps']:.0f} GB/s, bf16 matmul "
            f"{r['matmul_tflops']:.0f} TFLOP/s; {r['bytes'] / 1e9:.3g} GB moved, "
            f"{r['flops'] / 1e12:.3g} TFLOP)")


def markdown_table(results: dict) -> str:
    """A caption line, then one markdown table (a row per milestone), then the notes."""
    headers, rows = table_rows(results)
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = [caption(results), "",
             "| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    extra = []
    roof = roofline_text(results)
    if roof:
        extra.append(f"- {roof}")
    for row in results["rows"]:
        if row.get("note"):
            extra.append(f"- **{row['milestone']}**: {row['note']}")
    if extra:
        lines += [""] + extra
    return "\n".join(lines) + "\n"


def plain_table(results: dict) -> str:
    """The same table as plain aligned text, for a terminal."""
    headers, rows = table_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    out = [caption(results).replace("`", ""), line(headers),
           "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    roof = roofline_text(results)
    if roof:
        out.append(roof)
    for row in results["rows"]:
        if row.get("note"):
            out.append(f"note {row['milestone']}: {row['note']}")
    return "\n".join(out)
