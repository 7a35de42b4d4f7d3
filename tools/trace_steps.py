"""Who ran in each engine step, and with how many tokens: `python tools/trace_steps.py`.

A lead's tool (M5: chunked prefill). It builds a stage's `LLM` and drives its engine
itself (`engine.add_request`, `engine.step()`), with requests that arrive at given step
numbers: a request (arrival_step, prompt_len, max_tokens) is added just before step
`arrival_step` runs. Prompts are random token ids (seeded), sampling is greedy with
`ignore_eos`, so every stage gets the same requests at the same steps and should give
the same tokens.

It wraps `engine.scheduler.schedule` (the output goes on unchanged) and times
`engine.step()` with `time.perf_counter`. Per step it records the step index, its start
and end (seconds from the first step's start), the token budget
(`max_num_batched_tokens`), the tokens computed, and for each scheduled sequence:

- `request_id`, `num_new_tokens` (`len(new_token_ids)`), `num_computed_before`;
- `kind`: `decode` (one new token after the prompt), `prompt` (a whole prompt, or a
  whole recomputation after a preemption) or `chunk` (part of a prompt: M5's
  `ScheduledSequence.next_token_id` is not None for a chunk that stops inside the
  prompt; the last chunk of a prompt ends at its last token and gives a token);
- `token`: whether a token came out for it in that step (it is in the step's outputs).

A stage before M5 always schedules whole prompts (M2-M4: prefills first), and M5 with
`enable_chunked_prefill=False` does the same. `draw_timeline` draws the traces (and
`plot_timeline` into a PNG), one panel per row: x = step, y = request, one cell per
(step, request) that ran, coloured by kind, and above each panel the step's tokens
against the budget. The docs draw it from a committed file at build time
(`<!-- step-timeline: file=NAME.json -->`, tools/mkdocs_hooks.py); the M5 notebook
calls `trace_steps`, `draw_timeline` and `request_stats` directly.

    python tools/trace_steps.py --stages m4,m5 --model dummy:tiny-llama --device cpu \\
        --budget 64 --out trace.json --png trace.png         # ~10 s on a CPU
    python tools/trace_steps.py --stages m5,m5:enable_chunked_prefill=false

Rows are stages (`m4`, `m5_chunked_prefill`) or a stage with EngineConfig settings,
`NAME:KEY=VALUE[:KEY=VALUE]` as in bench/compare.py. The JSON (default
bench/scratch/trace-steps-<model>-<device>-<date>.json) opens with bench/compare.py's
provenance (command, git_commit, git_dirty, date, machine, versions), then the scenario
and one row per stage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib
import itertools
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import stages as registry  # noqa: E402
from bench.compare import BenchError, check_overrides, model_slug, parse_overrides  # noqa: E402

PROG = "python tools/trace_steps.py"
KINDS = ("decode", "prompt", "chunk")
KIND_COLORS = {"decode": "#4c72b0", "prompt": "#dd8452", "chunk": "#55a868"}
KIND_LABELS = {"decode": "decode (1 token)", "prompt": "whole prompt",
               "chunk": "chunk of a prompt"}
# A few requests decoding, a long prompt (4 x a budget of 64) arriving among them, then
# two short ones: (arrival_step, prompt_len, max_tokens).
DEFAULT_SCENARIO = [(0, 10, 20), (0, 14, 20), (0, 12, 20), (0, 16, 20),
                    (3, 256, 4), (4, 12, 8), (5, 20, 8)]
MAX_STEPS = 10_000  # a run that takes longer is a bug (nothing scheduled forever?)


# -- tracing one stage ----------------------------------------------------------------
def request_ids(arrivals) -> list[str]:
    """r0, r1, ... in the order of the arrivals list."""
    return [f"r{i}" for i in range(len(arrivals))]


def make_prompt(index: int, length: int, seed: int, vocab_size: int) -> list[int]:
    """`length` random token ids (not the first 3: they are special in most vocabularies),
    the same for every stage given the same seed and index."""
    rng = random.Random(seed * 100_003 + index)
    return [rng.randrange(3, min(vocab_size, 5000)) for _ in range(length)]


def kind_of(start: int, num_new: int, prompt_len: int, stops_inside: bool) -> str:
    """decode, prompt or chunk: what a sequence's new tokens are in this step."""
    if stops_inside:
        return "chunk"  # M5: a chunk that ends before the prompt does
    if start >= prompt_len and num_new == 1:
        return "decode"
    if start == 0:
        return "prompt"  # the whole prompt (with any output, after a preemption)
    return "chunk"  # the last chunk of a prompt: it ends at the last token


def default_engine_args(package: str, model: str, arrivals, kwargs: dict) -> dict:
    """`max_model_len` just long enough and a KV cache for every request at once (float32
    sizes, with room to spare), unless given: no preemption, no memory profiling."""
    args = dict(kwargs)
    longest = max(p + m for _, p, m in arrivals)
    args.setdefault("max_model_len", longest + 1)
    if "kv_cache_memory" not in args:
        loader = importlib.import_module(f"{package}.model_executor.model_loader")
        mc = loader.load_model_config(model)
        per_token = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * 4
        block = args.get("block_size", 16)
        tokens = sum(p + m + block for _, p, m in arrivals)
        args["kv_cache_memory"] = max(2 ** 20, 2 * tokens * per_token)
    return args


def trace_steps(stage: str, arrivals, model: str = "dummy:tiny-llama", seed: int = 0,
                label: str | None = None, **engine_kwargs) -> dict:
    """Run `arrivals` [(arrival_step, prompt_len, max_tokens), ...] on a stage ("m5" or
    "m5_chunked_prefill", with EngineConfig settings as keywords, e.g. device="cpu",
    max_num_batched_tokens=64) and return its trace: a dict with the settings, one entry
    per step (see the module docstring) and each request's output tokens."""
    info = registry.get(stage)
    if "batching" not in info.features:
        raise ValueError(f"{info.package} has no scheduler to trace (stages from m2 on)")
    arrivals = [tuple(a) for a in arrivals]
    kwargs = default_engine_args(info.package, model, arrivals, engine_kwargs)
    module = importlib.import_module(info.package)
    began = time.perf_counter()
    llm = module.LLM(model, **kwargs)
    load_s = time.perf_counter() - began
    try:
        row = {"row": label or info.short, "stage": info.package, "model": model,
               "engine_args": kwargs, "load_s": load_s}
        row.update(_drive(llm.engine, module.SamplingParams, arrivals, seed))
    finally:
        del llm
        gc.collect()
    return row


def _drive(engine, sampling_params, arrivals, seed: int) -> dict:
    """Add the requests at their steps and step the engine until every one finishes."""
    ids = request_ids(arrivals)
    prompt_len = {rid: p for rid, (_, p, _) in zip(ids, arrivals)}
    vocab = getattr(engine, "vocab_size", 5000)
    scheduled = []  # the scheduler's outputs, one per step
    original = engine.scheduler.schedule

    def schedule():
        out = original()
        scheduled.append(out)
        return out

    engine.scheduler.schedule = schedule
    steps, outputs, t0 = [], {}, None
    pending = sorted(zip(ids, arrivals), key=lambda item: item[1][0])
    try:
        for index in range(MAX_STEPS):
            while pending and pending[0][1][0] <= index:
                rid, (_, length, max_tokens) = pending.pop(0)
                engine.add_request(rid, make_prompt(int(rid[1:]), length, seed, vocab),
                                   sampling_params(temperature=0, max_tokens=max_tokens,
                                                   ignore_eos=True))
            if not pending and not engine.has_unfinished_requests():
                break
            start = time.perf_counter()
            t0 = start if t0 is None else t0
            step_out = engine.step()
            end = time.perf_counter()
            for out in step_out:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
            steps.append(_step_record(index, start - t0, end - t0, scheduled[-1],
                                      {o.request_id for o in step_out}, prompt_len,
                                      engine.config.max_num_batched_tokens,
                                      len(engine.scheduler.waiting)))
        else:
            raise RuntimeError(f"the requests did not finish in {MAX_STEPS} steps")
    finally:
        del engine.scheduler.schedule  # the class's method again
    config = engine.config
    return {"budget": config.max_num_batched_tokens,
            "chunked_prefill": bool(getattr(config, "enable_chunked_prefill", False)),
            "requests": [{"request_id": rid, "arrival_step": a, "prompt_len": p,
                          "max_tokens": m} for rid, (a, p, m) in zip(ids, arrivals)],
            "steps": steps, "run_s": steps[-1]["end_s"] if steps else 0.0,
            "outputs": {rid: outputs.get(rid, []) for rid in ids}}


def _step_record(index: int, start: float, end: float, out, with_token: set[str],
                 prompt_len: dict[str, int], budget: int, waiting: int) -> dict:
    seqs = []
    for s in out.scheduled:
        n = len(s.new_token_ids)
        inside = getattr(s, "next_token_id", None) is not None  # M5+; None before
        rid = s.seq_name  # one sample per request here: the sequence is named by its request
        seqs.append({"request_id": rid, "num_new_tokens": n,
                     "num_computed_before": s.num_computed_tokens,
                     "kind": kind_of(s.num_computed_tokens, n, prompt_len[rid], inside),
                     "token": rid in with_token})
    return {"step": index, "start_s": start, "end_s": end, "budget": budget,
            "num_tokens": sum(s["num_new_tokens"] for s in seqs),
            "num_waiting": waiting, "seqs": seqs}


# -- reading a trace ------------------------------------------------------------------
def token_steps(row: dict) -> dict[str, list[int]]:
    """Request id -> the steps in which a token came out for it."""
    got = {r["request_id"]: [] for r in row["requests"]}
    for step in row["steps"]:
        for s in step["seqs"]:
            if s["token"]:
                got[s["request_id"]].append(step["step"])
    return got


def request_stats(row: dict) -> list[dict]:
    """Per request: its arrival step, the step of its first token, the steps it waited
    for it (steps run from its arrival before the one that gave it), and once decoding
    the most steps in a row that ran without giving it a token (0: a token every step)."""
    stats = []
    tokens = token_steps(row)
    for r in row["requests"]:
        got = tokens[r["request_id"]]
        first = got[0] if got else None
        gaps = [b - a - 1 for a, b in itertools.pairwise(got)]
        stats.append({"request_id": r["request_id"], "prompt_len": r["prompt_len"],
                      "arrival_step": r["arrival_step"], "first_token_step": first,
                      "steps_to_first_token": None if first is None
                      else first - r["arrival_step"],
                      "longest_stall_steps": max(gaps, default=0),
                      "stalled_steps": sum(gaps)})
    return stats


def panel_title(row: dict) -> str:
    """'M4: prefills first, whole prompts' or 'M5: one token budget per step, ...'."""
    stage, _, settings = row["row"].partition(":")
    name = stage.upper() + (f" ({settings.replace(':', ', ')})" if settings else "")
    if row.get("chunked_prefill"):
        return f"{name}: one token budget per step, chunks beside decodes"
    return f"{name}: prefills first, whole prompts"


# -- the figure -----------------------------------------------------------------------
def plot_timeline(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """`draw_timeline` into a PNG file (matplotlib's Agg backend), 1000 px wide."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw_timeline(rows, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def draw_timeline(rows: list[dict], title: str | None = None):
    """One panel per row, stacked, the same step axis: a cell per (step, request) that
    ran, coloured by kind, the token count written in prompt and chunk cells where it
    fits, a dot where a token came out; above each panel, the step's tokens against the
    budget (red: over it). Returns the matplotlib figure (a notebook shows it)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ids = [r["request_id"] for r in rows[0]["requests"]]
    num_steps = max(len(row["steps"]) for row in rows)
    heights = [h for _ in rows for h in (1, 0.45 * len(ids) + 0.6)]
    fig, axes = plt.subplots(2 * len(rows), 1, sharex=True, figsize=(10, sum(heights) + 1.4),
                             gridspec_kw={"height_ratios": heights})
    for i, row in enumerate(rows):
        _draw_budget(axes[2 * i], row)
        _draw_cells(axes[2 * i + 1], row, ids, num_steps, fig)
        axes[2 * i].set_title(panel_title(row), fontsize=12, loc="left")
    axes[-1].set_xlabel("engine step")
    axes[-1].set_xlim(-0.5, num_steps - 0.5)
    handles = [Patch(color=KIND_COLORS[k], label=KIND_LABELS[k]) for k in KINDS]
    handles += [Line2D([], [], marker="o", color="black", linestyle="", markersize=4,
                       label="a token came out"),
                Line2D([], [], color="black", linestyle="--", label="token budget")]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=10, frameon=False)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def _draw_budget(ax, row: dict) -> None:
    """The tokens of each step as a bar, the budget as a dashed line."""
    steps = row["steps"]
    totals = [s["num_tokens"] for s in steps]
    over = [t > s["budget"] for t, s in zip(totals, steps)]
    ax.bar([s["step"] for s in steps], totals, width=0.8,
           color=["#c44e52" if o else "#999999" for o in over])
    ax.axhline(row["budget"], color="black", linestyle="--", linewidth=1)
    top = max(totals + [row["budget"]])
    ax.set_ylim(0, top * 1.15)
    ax.set_yticks([0, row["budget"]] + ([top] if top > 1.3 * row["budget"] else []))
    ax.set_ylabel("tokens", fontsize=9)
    ax.tick_params(labelsize=9)


def _draw_cells(ax, row: dict, ids: list[str], num_steps: int, fig) -> None:
    from matplotlib.patches import Rectangle

    lengths = {r["request_id"]: r["prompt_len"] for r in row["requests"]}
    y_of = {rid: len(ids) - 1 - n for n, rid in enumerate(ids)}  # the first on top
    cell_pt = fig.get_figwidth() * 72 * 0.85 / max(num_steps, 1)  # a cell's width in points
    for step in row["steps"]:
        x = step["step"]
        for s in step["seqs"]:
            y = y_of[s["request_id"]]
            ax.add_patch(Rectangle((x - 0.45, y - 0.38), 0.9, 0.76,
                                   color=KIND_COLORS[s["kind"]]))
            text = str(s["num_new_tokens"])
            if s["kind"] != "decode" and cell_pt >= 6.5 * len(text) + 2:
                ax.text(x, y, text, ha="center", va="center", fontsize=8, color="white",
                        fontweight="bold")
            if s["token"]:
                ax.plot(x + 0.28, y + 0.2, "o", color="black", markersize=3.5)
    for r in row["requests"]:  # where each request arrived
        ax.plot(r["arrival_step"] - 0.5, y_of[r["request_id"]], marker=">",
                color="grey", markersize=5)
    ax.set_ylim(-0.6, len(ids) - 0.4)
    ax.set_yticks([y_of[rid] for rid in ids],
                  [f"{rid} ({lengths[rid]}-tok prompt)" for rid in ids], fontsize=9)
    ax.grid(axis="x", color="#eeeeee")
    ax.set_axisbelow(True)


# -- the command line -----------------------------------------------------------------
class UsageError(Exception):
    """A bad argument: one `error:` line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Trace what a FoloVLLM engine runs in each step (which requests, how "
                    "many tokens, whole prompts, prompt chunks or decodes) for requests "
                    "arriving at given steps; write a JSON and optionally a timeline PNG.",
        epilog="Rows: STAGE or STAGE:KEY=VALUE[:KEY=VALUE] (EngineConfig settings), e.g. "
               "m4,m5,m5:enable_chunked_prefill=false. Every row gets the same arrivals.")
    p.add_argument("--stages", default="m4,m5",
                   help="comma-separated rows, stages from m2 on (default m4,m5)")
    p.add_argument("--model", default="dummy:tiny-llama",
                   help="dummy:NAME, 'default' or a local HF folder (default dummy:tiny-llama)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu (default) or cuda")
    p.add_argument("--budget", type=int, default=64,
                   help="max_num_batched_tokens of every row (default 64)")
    p.add_argument("--requests", metavar="STEP:PROMPT:MAX,...",
                   help="arrivals: arrival step, prompt tokens, max tokens per request "
                        "(default: " + ",".join(":".join(map(str, a))
                                                 for a in DEFAULT_SCENARIO) + ")")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (0)")
    p.add_argument("--out", metavar="FILE.json",
                   help="where the JSON goes (default bench/scratch/trace-steps-<model>-"
                        "<device>-<date>.json)")
    p.add_argument("--png", metavar="FILE.png", help="also draw the timeline here")
    return p


def parse_requests(text: str | None) -> list[tuple[int, int, int]]:
    if text is None:
        return list(DEFAULT_SCENARIO)
    arrivals = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            step, prompt, max_tokens = (int(x) for x in item.split(":"))
        except ValueError:
            raise UsageError(f"--requests: {item!r} is not STEP:PROMPT:MAX") from None
        if step < 0 or prompt < 1 or max_tokens < 1:
            raise UsageError(f"--requests: {item!r}: need STEP >= 0, PROMPT >= 1, MAX >= 1")
        arrivals.append((step, prompt, max_tokens))
    if not arrivals:
        raise UsageError("--requests: give at least one STEP:PROMPT:MAX")
    return arrivals


def parse_rows(text: str) -> list[tuple[str, str, dict]]:
    """'m4,m5:enable_chunked_prefill=false' -> [(label, package, settings), ...]."""
    rows = []
    for spec in (t.strip() for t in text.split(",") if t.strip()):
        try:
            name, overrides = parse_overrides(spec)
            stage = registry.get(name.lower())
        except BenchError as exc:
            raise UsageError(f"--stages: {exc}") from None
        except KeyError:
            raise UsageError(f"--stages: unknown stage {name!r}") from None
        if not stage.present or "batching" not in stage.features:
            raise UsageError(f"--stages: {stage.package} is not in this checkout or has no "
                             "scheduler (stages from m2 on)")
        try:
            check_overrides(spec, name, stage.package, overrides)
        except BenchError as exc:
            raise UsageError(f"--stages: {exc}") from None
        label = stage.short + spec[len(name):]
        rows.append((label, stage.package, overrides))
    if not rows:
        raise UsageError("--stages: give at least one stage")
    return rows


def default_out(model: str, device: str) -> Path:
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    return REPO / "bench" / "scratch" / f"trace-steps-{model_slug(model)}-{device}-{date}.json"


def summary_line(row: dict) -> str:
    steps = row["steps"]
    over = sum(s["num_tokens"] > s["budget"] for s in steps)
    mixed = sum(len({x["kind"] for x in s["seqs"]}) > 1 for s in steps)
    return (f"{row['row']:<32} {len(steps):>4} steps, {over} over the budget of "
            f"{row['budget']}, {mixed} mixing kinds, {row['run_s']:.2f} s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        arrivals = parse_requests(args.requests)
        rows_spec = parse_rows(args.stages)
        if args.budget < 1:
            raise UsageError("--budget: give at least 1 token")
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from bench.provenance import provenance

    results = provenance(PROG, argv, args.device)
    results.update(tool="tools/trace_steps.py", model=args.model, device=args.device,
                   budget=args.budget, seed=args.seed,
                   scenario=[{"arrival_step": a, "prompt_len": p, "max_tokens": m}
                             for a, p, m in arrivals], rows=[])
    for label, package, overrides in rows_spec:
        settings = {"device": args.device, "max_num_batched_tokens": args.budget, **overrides}
        row = trace_steps(package, arrivals, args.model, args.seed, label, **settings)
        results["rows"].append(row)
        print(summary_line(row), flush=True)
    out = Path(args.out) if args.out else default_out(args.model, args.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    if args.png:
        print(f"wrote {plot_timeline(results['rows'], args.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
