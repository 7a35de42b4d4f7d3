"""M7's GPTQ matmul kernels against bf16 torch.matmul: `python3 tools/bench_gptq_kernels.py`.

Introduced with M7. On a CUDA GPU, for the linear layers of one decoder layer of each
model named by --shapes (default both), at M = 1, 16, 64 and 256 rows:

- qwen2.5-0.5b (24 layers; hidden 896, intermediate 4864, 14 query and 2 kv heads of
  64), its seven linears as the checkpoint has them: q/o 896 x 896, k/v 896 -> 128,
  gate/up 896 -> 4864, down 4864 -> 896 (each distinct shape timed once);
- llama-3.1-8b (32 layers; hidden 4096, intermediate 14336, 32 query and 8 kv heads of
  128), its four linears as the engine runs them, merged: q/k/v 4096 -> 6144, o 4096 ->
  4096, gate/up 4096 -> 28672, down 14336 -> 4096;

it times `torch.matmul(x, W)` (x and W bf16, what an unquantized layer runs) and
`gptq_matmul` (ops/gptq_gemm.py, what `GPTQLinear` runs) on the same W rounded to 4 bits in groups of 64 (`gptq.rtn_layer`), with its
default launch settings, as a decode step runs them: one call per decoder layer of the
model, each on its own copy of the weights (together larger than the L2 cache, so the
weights come from memory), captured in one CUDA graph and replayed; the median per call.
It reports microseconds, the weight bytes each reads per second (4-bit: the packed
codes, bf16 scales and packed zero points), the ratio torch / gptq (above
1: the 4-bit kernel is faster) and, per model and M, the sum over a decoder layer's
linears (a table of its own: the layer sums of both models side by side, TB/s at
M = 1 being the issue's effective weight read). Before timing, each kernel's output is
checked against `gptq_matmul_ref` (fp32) on the same inputs; one that is wrong is
marked WRONG and the command exits 1.

`--sweep` also times a few other launch settings per path and M (block sizes, the split
of K, warps, stages, the word unpacking, and the other path's defaults), each checked
the same way, and prints each one's layer sum beside the default's: which defaults to
keep. It is kept small (a few settings per path; most of its time is compiling them).

    python3 tools/bench_gptq_kernels.py
    python3 tools/bench_gptq_kernels.py --shapes llama-3.1-8b --sweep --out g.json
    python3 tools/bench_gptq_kernels.py --interpret-smoke   # CPU: checks the script only

Without CUDA it refuses (exit code 2), unless `--interpret-smoke`: small fp32 shapes on
the CPU under the Triton interpreter, to check that the script works (its timings mean
nothing and the JSON says so: `timings_meaningful`: false). The JSON (default
bench/results/gptq-kernels-<gpu>-<date>-<time>.json) holds the provenance of the other
results files (command, git commit from FOLOVLLM_GIT_COMMIT or `git rev-parse`,
machine, versions), on a GPU the card's `roofline` (copy GB/s and bf16 matmul TFLOP/s,
`bench/roofline.py`), and the rows, each naming its `model`: kind "shape" (one shape at
one M), "layer" (the sum over a decoder layer per M), "sweep" (one launch setting at
one shape and M).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the stages and `bench` importable
    sys.path.insert(0, str(REPO))

PROG = "python3 tools/bench_gptq_kernels.py"
# Per model: its decoder layers (the copies of each weight a timed graph runs, as a
# decode step does, so the weights come from memory and not from the L2 cache), and its
# linears (names, K, N, how many of a decoder layer's linears have this shape).
SHAPE_SETS = {
    "qwen2.5-0.5b": (24, [("q_proj, o_proj", 896, 896, 2), ("k_proj, v_proj", 896, 128, 2),
                          ("gate_proj, up_proj", 896, 4864, 2), ("down_proj", 4864, 896, 1)]),
    "llama-3.1-8b": (32, [("qkv_proj", 4096, 6144, 1), ("o_proj", 4096, 4096, 1),
                          ("gate_up_proj", 4096, 28672, 1), ("down_proj", 14336, 4096, 1)]),
}
ROWS = (1, 16, 64, 256)
# --interpret-smoke: small shapes (one group of 64 rows, or two) and M on both paths
SMOKE_SHAPE_SETS = {
    "qwen2.5-0.5b": (2, [("q_proj, o_proj", 64, 32, 2), ("k_proj, v_proj", 64, 16, 2),
                         ("gate_proj, up_proj", 64, 64, 2), ("down_proj", 128, 32, 1)]),
    "llama-3.1-8b": (2, [("qkv_proj", 64, 48, 1), ("o_proj", 64, 32, 1),
                         ("gate_up_proj", 64, 96, 1), ("down_proj", 128, 32, 1)]),
}
SMOKE_ROWS = [1, 17]
BITS, GROUP_SIZE = 4, 64
REL_TOLERANCE = 2e-2  # max abs error allowed, as a fraction of the reference's max |y|
# --sweep: overrides of each path's default launch settings (gptq_gemm.GPU_CONFIGS)
SWEEP = {
    "gemv": [{"last_adds": False}, {"block_n": 128}, {"block_n": 32}, {"fill": 1},
             {"fill": 4}, {"block_k": 32}, {"num_warps": 2}, {"num_warps": 8},
             {"num_stages": 2}, {"block_n": 128, "fill": 4},
             # wider column tiles: more columns per thread, so each x it loads serves more
             {"block_n": 256}, {"block_n": 256, "num_warps": 8}, {"block_n": 512, "fill": 2},
             {"path": "dequant"}, {"path": "decode", "block_k": 256, "fill": 1}],
    "decode": [{"block_k": 256, "fill": 1}, {"block_k": 64, "fill": 2},
               {"block_n": 16, "block_k": 256, "fill": 0}, {"block_k": 128, "fill": 1},
               {"path": "dequant"}, {"path": "gemv"}],
    "dequant": [{"block_n": 128}, {"block_n": 1024}, {"path": "prefill", "block_n": 64,
                                                       "fill": 1},
                {"path": "prefill", "block_m": 128, "block_n": 64, "num_warps": 8},
                {"path": "prefill", "block_m": 16, "block_n": 32, "block_k": 256,
                 "num_warps": 4},
                {"path": "decode", "block_k": 256, "fill": 1}],
    "prefill": [{"block_n": 64}, {"block_m": 32, "block_n": 64, "num_warps": 4},
                {"block_m": 16, "block_n": 32, "block_k": 256, "num_warps": 4},
                {"block_m": 128, "block_n": 64, "num_warps": 8}, {"block_n": 64, "fill": 1},
                {"path": "dequant"}, {"path": "dequant", "block_n": 128},
                {"path": "dequant", "block_n": 512}],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="M7's GPTQ matmul (4-bit, groups of 64) against bf16 "
        "torch.matmul on the linear shapes of qwen2.5-0.5b and llama-3.1-8b at M = 1, 16, "
        "64, 256: microseconds, weight GB/s, the ratio, the sum over a decoder layer "
        "(and its TB/s); markdown tables and a JSON.",
        epilog="Needs a CUDA GPU (exit code 2 without one). Every output is checked "
               "against the fp32 reference first; a wrong one is marked WRONG and the exit "
               "code is 1.")
    p.add_argument("--out", metavar="FILE.json",
                   help="where the JSON goes (default "
                        "bench/results/gptq-kernels-<gpu>-<date>-<time>.json)")
    p.add_argument("--shapes", default=",".join(SHAPE_SETS),
                   help=f"comma-separated models whose linear shapes to time (default "
                        f"{','.join(SHAPE_SETS)}; choose from {', '.join(SHAPE_SETS)})")
    p.add_argument("--sweep", action="store_true",
                   help="also time other launch settings per path and M (block sizes, "
                        "split of K, warps, stages, unpacking, the other path's defaults)")
    p.add_argument("--stage", default=None,
                   help="the stage package whose kernels run (default: the newest with GPTQ)")
    p.add_argument("--rows", default=",".join(map(str, ROWS)),
                   help=f"comma-separated M values (default {','.join(map(str, ROWS))})")
    p.add_argument("--interpret-smoke", action="store_true",
                   help="run small fp32 shapes on the CPU under the Triton interpreter, to "
                        "check the script works; timings are meaningless (and labelled so)")
    return p


# -- rows and tables (no GPU needed: tests/test_gptq_kernels.py runs these) -----------
def weight_bytes(k: int, n: int, bits: int | None) -> int:
    """Bytes of weight a matmul reads: bf16 W (bits None), or packed codes + bf16 scales
    + packed zero points in groups of GROUP_SIZE."""
    if bits is None:
        return k * n * 2
    groups = k // GROUP_SIZE
    return k * n * bits // 8 + groups * n * 2 + groups * n * bits // 8


def shape_row(model: str, m: int, name: str, k: int, n: int, count: int,
              torch_us: float | None, gptq_us: float | None, max_abs_err: float,
              tolerance: float, plan: dict) -> dict:
    """One shape of `model` at one M: both timings, weight GB/s, ratio torch / gptq, the
    check."""
    def gbps(bits, us):
        return None if us is None else weight_bytes(k, n, bits) / us / 1e3

    ok = max_abs_err <= tolerance  # False for nan too
    return {"kind": "shape", "model": model, "m": m, "linears": name, "k": k, "n": n,
            "count": count, "torch_us": torch_us, "gptq_us": gptq_us,
            "torch_gbps": gbps(None, torch_us), "gptq_gbps": gbps(BITS, gptq_us),
            "ratio": None if not (torch_us and gptq_us) else torch_us / gptq_us,
            "max_abs_err": max_abs_err, "tolerance": tolerance, "ok": ok, "plan": plan}


def layer_rows(rows: list[dict]) -> list[dict]:
    """Per model and M: torch's and gptq's time summed over a decoder layer's linears,
    and the weight bytes of the layer read per second."""
    out = []
    shapes = [r for r in rows if r["kind"] == "shape"]
    for model, m in dict.fromkeys((r["model"], r["m"]) for r in shapes):
        mine = [r for r in shapes if r["model"] == model and r["m"] == m]
        full = all(r["torch_us"] is not None and r["gptq_us"] is not None for r in mine)
        torch_us = sum(r["count"] * r["torch_us"] for r in mine) if full else None
        gptq_us = sum(r["count"] * r["gptq_us"] for r in mine) if full else None

        def gbps(bits, us):
            read = sum(r["count"] * weight_bytes(r["k"], r["n"], bits) for r in mine)
            return read / us / 1e3 if us else None

        out.append({"kind": "layer", "model": model, "m": m,
                    "linears": sum(r["count"] for r in mine),
                    "torch_us": torch_us, "gptq_us": gptq_us,
                    "torch_gbps": gbps(None, torch_us), "gptq_gbps": gbps(BITS, gptq_us),
                    "ratio": torch_us / gptq_us if full else None,
                    "ok": all(r["ok"] for r in mine)})
    return out


def sweep_row(model: str, m: int, name: str, k: int, n: int, count: int, config: dict,
              us: float | None, plan: dict, error: str | None = None,
              label: str | None = None) -> dict:
    """One launch setting (`config`: overrides of the path's defaults) at one shape."""
    return {"kind": "sweep", "model": model, "m": m, "linears": name, "k": k, "n": n,
            "count": count, "config": config, "label": label or config_label(config),
            "us": us, "plan": plan, "error": error}


def config_label(config: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in config.items()) or "default"


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _tbps(gbps: float | None) -> str:
    return _f(None if gbps is None else gbps / 1e3, ".2f")


def markdown(headers: list[str], body: list[list[str]], text_columns: int = 2) -> str:
    """A markdown table: the first `text_columns` columns left-aligned, numbers right."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i < text_columns else "---:"
                            for i in range(len(headers))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def results_table(rows: list[dict]) -> str:
    """Per model: its shapes and layer sums, M by M."""
    tables = []
    for model in dict.fromkeys(r["model"] for r in rows if r["kind"] == "shape"):
        body = []
        for r in rows:
            if r.get("model") != model:
                continue
            if r["kind"] == "shape":
                plan = r.get("plan") or {}
                body.append([str(r["m"]), r["linears"], f"{r['k']} x {r['n']}",
                             _f(r["torch_us"], ".1f"), _f(r["gptq_us"], ".1f"),
                             _f(r["ratio"], ".2f"), _tbps(r["torch_gbps"]),
                             _tbps(r["gptq_gbps"]), str(plan.get("path", "-")),
                             "x".join(map(str, plan.get("grid", ()))) or "-",
                             _f(r["max_abs_err"], ".1e"), "ok" if r["ok"] else "WRONG"])
            elif r["kind"] == "layer":
                body.append([str(r["m"]), f"layer ({r['linears']} linears)", "",
                             _f(r["torch_us"], ".1f"), _f(r["gptq_us"], ".1f"),
                             _f(r["ratio"], ".2f"), _tbps(r["torch_gbps"]),
                             _tbps(r["gptq_gbps"]), "", "", "", "ok" if r["ok"] else "WRONG"])
        tables.append(f"{model}:\n\n" + markdown(
            ["M", "linears", "K x N", "torch us", "gptq us", "torch/gptq", "torch TB/s",
             "gptq TB/s", "path", "grid", "err", "check"], body))
    return "\n\n".join(tables)


def layer_table(rows: list[dict]) -> str:
    """The layer sums of every model side by side, M by M."""
    layers = [r for r in rows if r["kind"] == "layer"]
    body = [[r["model"], str(r["m"]), _f(r["torch_us"], ".1f"), _f(r["gptq_us"], ".1f"),
             _f(r["ratio"], ".2f"), _tbps(r["torch_gbps"]), _tbps(r["gptq_gbps"]),
             "ok" if r["ok"] else "WRONG"]
            for m in dict.fromkeys(r["m"] for r in layers) for r in layers if r["m"] == m]
    return markdown(["model", "M", "layer torch us", "layer gptq us", "torch/gptq",
                     "torch TB/s", "gptq TB/s", "check"], body)


def sweep_table(rows: list[dict]) -> str:
    """Per model, M and launch setting: the sum over a decoder layer, and the default's
    over it (above 1: faster than the default); * marks the fastest per model and M."""
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for r in rows:
        if r["kind"] == "sweep":
            groups.setdefault((r["model"], r["m"], r["label"]), []).append(r)
    sums = {key: (None if any(r["us"] is None for r in rs)
                  else sum(r["count"] * r["us"] for r in rs)) for key, rs in groups.items()}
    best = {}
    for (model, m, label), total in sums.items():
        if total is not None and ((model, m) not in best
                                  or total < sums[(model, m, best[(model, m)])]):
            best[(model, m)] = label
    body = []
    for (model, m, label), rs in groups.items():
        total, default = sums[(model, m, label)], sums.get((model, m, "default"))
        errors = "; ".join(f"{r['linears']}: {r['error']}" for r in rs if r["error"])
        body.append([model, str(m), label + (" *" if best.get((model, m)) == label else ""),
                     _f(total, ".1f"),
                     _f(default / total if total and default else None, ".2f"),
                     errors[:100] or "ok"])
    return markdown(["model", "M", "config", "layer us", "default / this", "errors"], body,
                    text_columns=3)


def write_results(path: Path, header: dict, rows: list[dict]) -> str:
    """Write the JSON (header + rows) and return the tables as markdown."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**header, "rows": rows}, indent=1) + "\n")
    text = results_table(rows) + "\n\nlayer sums:\n\n" + layer_table(rows)
    if any(r["kind"] == "sweep" for r in rows):
        text += "\n\n" + sweep_table(rows)
    return text


def default_out_path(gpu_name: str) -> Path:
    """bench/results/gptq-kernels-h100-20261127-013000.json for an "NVIDIA H100 ..." """
    found = re.search(r"\b([A-Z]\d{2,4}[A-Za-z]?)\b", gpu_name)
    short = (found.group(1) if found else re.sub(r"[^A-Za-z0-9]+", "-", gpu_name)).lower()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return REPO / "bench" / "results" / f"gptq-kernels-{short}-{stamp}.json"


def parse_shapes(value: str) -> list[str]:
    """--shapes: model names from SHAPE_SETS, comma-separated (ValueError otherwise)."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in names if v not in SHAPE_SETS]
    if not names or unknown:
        raise ValueError(f"--shapes: choose from {', '.join(SHAPE_SETS)}, comma-separated; "
                         f"got {value!r}")
    return list(dict.fromkeys(names))


# -- measuring -----------------------------------------------------------------------
class Bench:
    """Where and how to measure: CUDA in bf16 replaying CUDA graphs, or (--interpret-smoke) the
    CPU in fp32 under the Triton interpreter, timing one call's wall time."""

    def __init__(self, ops, gptq, smoke: bool, models: list[str]) -> None:
        import torch

        self.ops, self.gptq, self.smoke = ops, gptq, smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.dtype = torch.float32 if smoke else torch.bfloat16  # the interpreter's bf16
        sets = SMOKE_SHAPE_SETS if smoke else SHAPE_SETS          # dot is wrong
        self.shape_sets = {model: sets[model] for model in models}
        self.sms = ops.num_sms(self.device)

    def layer(self, k: int, n: int, seed: int):
        """A dense weight W [K, N] (values like a trained layer's) and its 4-bit RTN
        checkpoint tensors (qweight, scales in the bench's dtype, qzeros)."""
        import torch

        g = torch.Generator().manual_seed(seed)
        weight = 0.02 * torch.randn(n, k, generator=g)  # [out, in], as nn.Linear holds it
        ckpt = self.gptq.rtn_layer(weight, self.gptq.GPTQConfig(bits=BITS,
                                                                group_size=GROUP_SIZE))
        dense = weight.t().contiguous().to(self.device, self.dtype)
        checkpoint = (ckpt["qweight"].to(self.device),
                      ckpt["scales"].to(self.device, self.dtype), ckpt["qzeros"].to(self.device))
        return dense, checkpoint

    def check(self, x, checkpoint, config: dict) -> tuple[float, float]:
        """(max abs error of gptq_matmul with `config` vs the fp32 reference, tolerance)."""
        got = self.ops.gptq_matmul(x, *checkpoint, GROUP_SIZE, BITS, **config)
        want = self.ops.gptq_matmul_ref(x, *checkpoint, GROUP_SIZE, BITS).float()
        err = (got.float() - want).abs().max().item()
        return err, REL_TOLERANCE * want.abs().max().item() + 1e-3

    def time_us(self, call, args, copies: int, quick: bool) -> float:
        """Microseconds per `call(*args)`, as a decode step sees it: `copies` calls (one per
        decoder layer), each on its own copy of the weight tensors in `args` (the copies
        together exceed the L2 cache, as a model's layers do), captured in one CUDA graph
        and replayed; the median over replays (smoke: one call's wall time on the CPU)."""
        import torch

        if self.smoke:
            began = time.perf_counter()
            call(*args)
            return (time.perf_counter() - began) * 1e6
        each_copy = [args] + [tuple(a if i == 0 else a.clone() for i, a in enumerate(args))
                              for _ in range(copies - 1)]  # args[0] is x, shared
        for each in each_copy:  # compile and warm up outside the capture
            call(*each)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for each in each_copy:
                call(*each)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(10 if quick else 30):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / copies)
        del graph, each_copy
        return statistics.median(times)

    def gptq_call(self, config: dict):
        """gptq_matmul(x, qweight, scales, qzeros) with the bench's grid and `config`."""
        return lambda x, *checkpoint: self.ops.gptq_matmul(x, *checkpoint, GROUP_SIZE, BITS,
                                                           **config)

    def plan(self, m: int, k: int, n: int, config: dict) -> dict:
        """The launch a call makes (path, block sizes, grid, splits), for the JSON."""
        plan = self.ops.launch_plan(m, n, k, GROUP_SIZE, self.sms, **config)
        return {key: (list(v) if isinstance(v, tuple) else v) for key, v in plan.items()}

    def sweep_configs(self, m: int) -> list[tuple[str, dict]]:
        """(label, overrides): the default, SWEEP's for M's path, the other path's
        defaults (smoke: the default and one more, at the first shape of each model)."""
        path = self.ops.default_config(m)["path"]
        other = "prefill" if path != "prefill" else "decode"
        configs = ([("default", {})] + [(config_label(c), c) for c in SWEEP[path]]
                   + [(f"{other} defaults", dict(path=other, **self.ops.GPU_CONFIGS[other]))])
        return configs[:2] if self.smoke else configs

    def run(self, rows_m: list[int], sweep: bool) -> list[dict]:
        """Per model: the shape rows and each M's layer sum, M by M; then the sweep rows."""
        import torch

        ordered, swept = [], []
        for model, (copies, shapes) in self.shape_sets.items():
            rows = []
            print(f"{model} ({copies} decoder layers):", flush=True)
            for index, (name, k, n, count) in enumerate(shapes):
                dense, checkpoint = self.layer(k, n, seed=index)
                for m in rows_m:
                    x = torch.randn(m, k, device=self.device, dtype=self.dtype)
                    rows.append(self.shape(model, copies, m, name, k, n, count, x, dense,
                                           checkpoint))
                    if sweep and (index == 0 or not self.smoke):  # smoke: one shape
                        swept += self.sweep(model, copies, m, name, k, n, count, x,
                                            checkpoint)
                del dense, checkpoint
            layers = layer_rows(rows)
            for m in rows_m:
                ordered += [r for r in rows + layers if r["m"] == m]
        swept.sort(key=lambda r: (list(self.shape_sets).index(r["model"]),
                                  rows_m.index(r["m"])))
        return ordered + swept

    def shape(self, model, copies, m, name, k, n, count, x, dense, checkpoint) -> dict:
        import torch

        plan = self.plan(m, k, n, {})
        try:
            err, tol = self.check(x, checkpoint, {})
            torch_us = self.time_us(torch.matmul, (x, dense), copies, quick=False)
            gptq_us = self.time_us(self.gptq_call({}), (x, *checkpoint), copies, quick=False)
            row = shape_row(model, m, name, k, n, count, torch_us, gptq_us, err, tol, plan)
        except Exception as exc:  # a kernel that fails to compile or launch: a row
            row = shape_row(model, m, name, k, n, count, None, None, float("nan"), 0.0, plan)
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        print(f"  M={m} {name} {k}x{n}: "
              + ("ok" if row["ok"] else f"WRONG {row.get('error', row['max_abs_err'])}")
              + (f", torch {row['torch_us']:.1f} us, gptq {row['gptq_us']:.1f} us"
                 if row["gptq_us"] else ""), flush=True)
        return row

    def sweep(self, model, copies, m, name, k, n, count, x, checkpoint) -> list[dict]:
        out = []
        for label, config in self.sweep_configs(m):
            plan, us, error = {}, None, None
            try:
                plan = self.plan(m, k, n, config)
                err, tol = self.check(x, checkpoint, config)
                if not err <= tol:
                    error = f"WRONG: max abs err {err:.3g} > {tol:.3g}"
                else:
                    us = self.time_us(self.gptq_call(config), (x, *checkpoint), copies,
                                      quick=True)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            out.append(sweep_row(model, m, name, k, n, count, config, us, plan, error,
                                 label))
        return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        rows_m = [int(v) for v in args.rows.split(",") if v.strip()]
        assert rows_m and all(v > 0 for v in rows_m)
    except (ValueError, AssertionError):
        print(f"error: --rows: positive integers separated by commas, got {args.rows!r}",
              file=sys.stderr)
        return 2
    try:
        models = parse_shapes(args.shapes)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    smoke = args.interpret_smoke
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the stage's kernels are imported
        rows_m = SMOKE_ROWS if args.rows == ",".join(map(str, ROWS)) else rows_m
    import torch

    if not smoke and not torch.cuda.is_available():
        print("error: tools/bench_gptq_kernels.py needs a CUDA GPU (torch sees none); "
              "--interpret-smoke checks the script on the CPU instead", file=sys.stderr)
        return 2
    from bench.provenance import provenance
    from bench.stages import stages_with

    stage = args.stage or stages_with("gptq")[-1]
    ops = importlib.import_module(f"{stage}.ops.gptq_gemm")
    gptq = importlib.import_module(f"{stage}.model_executor.layers.quantization.gptq")
    bench = Bench(ops, gptq, smoke, models)
    header = provenance(PROG, argv, bench.device.type)
    gpu = header["machine"]["gpu"] or "cpu"
    dtype = str(bench.dtype).removeprefix("torch.")
    print(f"{gpu}, {bench.sms} SMs; {stage}; {dtype} x, {BITS}-bit weights in groups of "
          f"{GROUP_SIZE}", flush=True)
    if smoke:
        print("INTERPRET SMOKE: tiny shapes on the CPU under the Triton interpreter; the "
              "timings are meaningless", flush=True)
    began = time.perf_counter()
    if not smoke:  # the card's copy bandwidth and bf16 matmul rate: the roofline of a plot
        from bench.roofline import measure
        header["roofline"] = measure("cuda")
    with torch.inference_mode():
        rows = bench.run(rows_m, args.sweep)
    header.update(stage=stage, bits=BITS, group_size=GROUP_SIZE, dtype=dtype,
                  interpret_smoke=smoke, timings_meaningful=not smoke,
                  shape_sets={model: {"decoder_layers": copies, "linears": [
                      {"linears": name, "k": k, "n": n, "count": count}
                      for name, k, n, count in shapes]}
                      for model, (copies, shapes) in bench.shape_sets.items()},
                  timing=("wall time of one call under the Triton interpreter" if smoke else
                          "per model, a CUDA graph of one call per decoder layer, each on "
                          "its own copy of the weights (more than the L2 cache), replayed; "
                          "median per call"),
                  default_configs=ops.GPU_CONFIGS, decode_max_m=ops.DECODE_MAX_M,
                  dequant_min_m=ops.DEQUANT_MIN_M,
                  rel_tolerance=REL_TOLERANCE, seconds=time.perf_counter() - began)
    out = Path(args.out) if args.out else default_out_path(gpu)
    print()
    print(write_results(out, header, rows))
    print(f"\nresults: {out}")
    bad = [r for r in rows if (r["kind"] == "shape" and not r["ok"])
           or (r["kind"] == "sweep" and r["error"])]
    if bad:
        print(f"error: {len(bad)} row(s) WRONG or failed (see the tables and the JSON)",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
