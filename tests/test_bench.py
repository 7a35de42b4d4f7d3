"""The bench harness: end to end on CPU with a tiny dummy model (the default `concurrent`
workload, --repeat, scratch vs --publish, the estimate, provenance, the inter-token
latency of every stage and hf, a row with its own engine settings, the multi-turn `chat`
workload and its driver), its errors, the roofline schedule and the report (the
120-column table, times in seconds, the ITL table and CDF, the prefix cache's hit rate,
why the rows differ, the plot's panels, `python -m bench.report FILE`).

Introduced with the bench (M1).
"""

import functools
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import compare, report, worker  # noqa: E402
from bench.compare import parse_bytes, percentile  # noqa: E402
from bench.roofline import ModelCost, simulate  # noqa: E402
from bench.workloads import Workload, build_workload  # noqa: E402

PREFIX_KEYS = {"prefix_cache_queries", "prefix_cache_hits", "prefix_cache_hit_rate"}
SUMMARY_KEYS = {"ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms", "tpot_mean_ms", "tpot_p50_ms",
                "tpot_p99_ms", "e2e_mean_s", "e2e_p50_s", "e2e_p99_s", "output_tokens_per_s",
                "requests_per_s", "total_time_s", "peak_memory_mib", "max_concurrent_seqs",
                "throughput_ratio", "roofline_fraction", "kv_cache", "runs", "spread",
                "itl_mean_ms", "itl_p50_ms", "itl_p99_ms", "itl_max_ms", "itl_quantiles_ms",
                "itl_gaps", "weights", *PREFIX_KEYS}
TINY_VOCAB = 512  # dummy:tiny-llama


def run_compare(*args: str, timeout: int = 240, env: dict | None = None
                ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "compare.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, **(env or {})))


def _assert_itl(summary: dict, gaps: int) -> None:
    """A row's pooled ITL: every key set, consistent, and 101 rising percentiles."""
    assert summary["itl_gaps"] == gaps
    quantiles = summary["itl_quantiles_ms"]
    assert len(quantiles) == 101 and quantiles == sorted(quantiles)
    assert quantiles[0] >= 0 and quantiles[100] == pytest.approx(summary["itl_max_ms"])
    assert quantiles[50] == pytest.approx(summary["itl_p50_ms"])
    assert quantiles[99] == pytest.approx(summary["itl_p99_ms"])
    assert 0 < summary["itl_p50_ms"] <= summary["itl_p99_ms"] <= summary["itl_max_ms"]
    assert quantiles[0] <= summary["itl_mean_ms"] <= summary["itl_max_ms"]


@pytest.mark.parametrize("workload, output_len, extra, plot", [
    ("latency", "4", [], True),
    # different output lengths inside one hf batch; hf batches of 2 and 1; m1 has no
    # max_batch_size and must say that it ignored it
    ("throughput", "2:6", ["--max-batch-size", "2", "--no-plot"], False),
])
def test_end_to_end_on_cpu(tmp_path, workload, output_len, extra, plot):
    args = ["--milestones", "m1,hf", "--workload", workload, "--model", "dummy:tiny-llama",
            "--device", "cpu", "--input-len", "8", "--output-len", output_len,
            "--num-prompts", "3", "--seed", "3", "--threads", "1", "--no-progress",
            "--out-dir", str(tmp_path)]
    proc = run_compare(*args, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]

    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 1
    assert re.fullmatch(rf"{workload}-dummy-tiny-llama-cpu-\d{{8}}-\d{{6}}\.json",
                        files[0].name)
    assert (tmp_path / (files[0].stem + ".png")).is_file() == plot

    results = report.load_results(files[0])
    assert results["workload"] == workload and results["model"] == "dummy:tiny-llama"
    assert results["device"] == "cpu" and results["roofline"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", results["date"])
    assert results["machine"]["gpu"] is None and results["machine"]["cpu_count"] >= 1
    assert {"python", "torch", "transformers", "triton", "numpy"} <= set(results["versions"])
    assert results["published"] is False and isinstance(results["git_dirty"], bool)
    assert re.fullmatch(r"[0-9a-f]{40}", results["git_commit"])
    assert results["command"].startswith("python bench/compare.py --milestones m1,hf")
    cfg = results["config"]
    assert cfg["num_prompts"] == 3 and cfg["seed"] == 3 and cfg["input_len"] == [8, 8]
    assert cfg["engine"]["dtype"] == "float32"

    expected = build_workload(workload, TINY_VOCAB, seed=3, num_prompts=3, input_len=8,
                              output_len=4 if output_len == "4" else (2, 6)).output_lens
    assert [r["milestone"] for r in results["rows"]] == ["m1", "hf"]
    for row in results["rows"]:
        assert set(row["summary"]) == SUMMARY_KEYS
        assert all(row["summary"][key] is None for key in PREFIX_KEYS)  # no prefix cache
        weights = row["summary"]["weights"]  # the model's bytes; none measured for hf
        assert weights is None if row["milestone"] == "hf" else weights["total"] > 0
        assert [s["output_len"] for s in row["samples"]] == expected
        for s in row["samples"]:
            assert s["prompt_len"] == 8
            assert 0 < s["ttft_s"] <= s["e2e_s"] and s["tpot_s"] >= 0
            if s["output_len"] > 1:  # its own gaps: their mean is its TPOT (hf: exactly)
                assert 0 < s["itl_mean_s"] <= s["itl_max_s"] < s["e2e_s"]
                assert s["itl_mean_s"] == pytest.approx(s["tpot_s"], rel=0.5, abs=1e-3)
        summary = row["summary"]
        _assert_itl(summary, sum(n - 1 for n in expected))
        assert summary["output_tokens_per_s"] == pytest.approx(
            sum(expected) / summary["total_time_s"])
        assert summary["peak_memory_mib"] > 0 and summary["roofline_fraction"] is None
    first, hf = (row["summary"] for row in results["rows"])
    assert first["throughput_ratio"] == 1.0
    assert hf["throughput_ratio"] == pytest.approx(
        hf["output_tokens_per_s"] / first["output_tokens_per_s"])
    assert first["max_concurrent_seqs"] == 1  # m1: no batching, or the latency workload
    if workload == "throughput":
        assert cfg["engine"]["max_batch_size"] == 2
        assert hf["max_concurrent_seqs"] == 2
        assert "no max_batch_size (ignored)" in results["rows"][0]["note"]
        assert "batches of up to 2 prompts" in results["rows"][1]["note"]
    else:
        assert hf["max_concurrent_seqs"] == 1
        assert results["rows"][0]["note"] == ""

    if plot:  # with the ITL p99 panel: five panels in 3 x 2, still 900 px wide
        png = (tmp_path / (files[0].stem + ".png")).read_bytes()
        width, height = struct.unpack(">II", png[16:24])
        assert width == 900 and 800 < height < width
    out = proc.stdout
    assert "TTFT ms p50/p99" in out and "output tok/s" in out
    assert re.search(r"^milestone +ITL mean ms +ITL p50 ms +ITL p99 ms +ITL max ms +gaps$",
                     out, re.M)
    assert re.search(r"^m1 +1 \(one at a time\) .* 1\.00x +\d+\s*$", out, re.M)
    assert re.search(r"^hf .*x +\d+\s*$", out, re.M)
    assert re.search(r"^m1: one request at a time", out, re.M)
    assert "Why the rows differ" in out


@pytest.mark.parametrize("args, message", [
    (["--milestones", "m1,m9"], "unknown milestone 'm9'"),
    (["--milestones", "m1,vllm"], "unknown milestone 'vllm'"),
    (["--milestones", "m0,m1"], "'m0' (m0_init) cannot generate"),
    (["--milestones", "m1,m1"], "listed twice"),
    (["--milestones", "m1,m3:no_such_knob=1"],
     "'m3:no_such_knob=1': m3 (m3_paged_kv) has no EngineConfig setting no_such_knob"),
    (["--milestones", "m1", "--workload", "bursty"], "invalid choice: 'bursty'"),
    (["--milestones", "m1", "--kv-cache-memory", "lots"], "is not a size"),
    (["--milestones", "m5", "--turns", "3"],
     "--turns applies to the chat workload only (multi-turn conversations: --workload chat)"),
    (["--milestones", "m5", "--workload", "prefix", "--turn-len", "8"],
     "--turn-len applies to the chat workload only"),
    (["--milestones", "m5", "--workload", "chat", "--turns", "0"], "--turns: must be >= 1"),
    (["--milestones", "m5", "--workload", "chat", "--turn-len", "9:3"],
     "'9:3': need 1 <= LO <= HI"),
])
def test_bad_arguments_exit_2_with_a_clear_message(args, message):
    proc = run_compare(*args, "--device", "cpu", timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_stage_is_a_clear_error():
    missing = next((m for m, pkg in [("m7", "m7_gptq"), ("m6", "m6_prefix_cache")]
                    if not (REPO / pkg).exists()), None)
    if missing is None:  # every stage exists: then m0 is the only non-bench stage
        missing = "m0"
    proc = run_compare("--milestones", f"m1,{missing}", "--device", "cpu", timeout=60)
    assert proc.returncode == 2
    assert f"'{missing}'" in proc.stderr and "error:" in proc.stderr


def test_workload_too_long_for_max_model_len():
    proc = run_compare("--milestones", "m1", "--model", "dummy:tiny-llama", "--device", "cpu",
                       "--input-len", "30", "--output-len", "10", "--max-model-len", "32",
                       timeout=120)
    assert proc.returncode == 2
    assert "needs up to 40 tokens" in proc.stderr


def test_help():
    proc = run_compare("--help", timeout=60)
    assert proc.returncode == 0 and "--milestones" in proc.stdout
    assert "--workload" in proc.stdout and "--kv-cache-memory" in proc.stdout
    assert "--repeat" in proc.stdout and "--publish" in proc.stdout
    assert "(default: concurrent)" in proc.stdout
    assert "--turns N" in proc.stdout and "--turn-len N|LO:HI" in proc.stdout
    assert "chat (multi-turn:" in " ".join(proc.stdout.split())


def test_defaults():
    args = compare.build_parser().parse_args(["--milestones", "m1"])
    assert args.workload == "concurrent" and args.repeat == 1
    assert args.publish is False and args.out_dir is None


def test_default_run_repeats_into_scratch_then_publish_estimates(tmp_path):
    """No --workload, --repeat 2, no --out-dir: the scratch folder; then --publish: the
    results folder, with an estimate from the first file. Neither touches the repo."""
    scratch, published = tmp_path / "scratch", tmp_path / "results"
    env = {"FOLOVLLM_BENCH_SCRATCH": str(scratch), "FOLOVLLM_BENCH_RESULTS": str(published)}
    common = ["--model", "dummy:tiny-llama", "--device", "cpu", "--num-prompts", "3",
              "--input-len", "6:10", "--output-len", "3:5", "--threads", "1", "--no-progress"]
    proc = run_compare("--milestones", "m1,m2", "--repeat", "2", *common, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no earlier results file" in proc.stderr
    assert "one request at a time: m1" in proc.stderr
    assert "run 2 of 2" in proc.stderr
    assert not published.exists()
    (path,) = scratch.glob("*.json")
    assert path.name.startswith("concurrent-dummy-tiny-llama-cpu-")
    assert path.with_suffix(".png").is_file()
    assert "--publish" in proc.stdout and "scratch" in proc.stdout
    results = report.load_results(path)
    assert results["workload"] == "concurrent" and results["published"] is False
    assert results["config"]["repeat"] == 2
    assert results["config"]["output_len"] == [3, 5]
    m1, m2 = results["rows"]
    assert m1["summary"]["max_concurrent_seqs"] == 1
    assert m2["summary"]["max_concurrent_seqs"] == 3  # all three at once
    for row in (m1, m2):
        s = row["summary"]
        assert set(s) == SUMMARY_KEYS and s["runs"] == 2 and len(row["repeats"]) == 2
        assert row["wall_s"] > s["total_time_s"] * 2
        for key in ("output_tokens_per_s", "ttft_p50_ms", "total_time_s", "itl_p99_ms"):
            runs = [r[key] for r in row["repeats"]]
            assert s["spread"][key] == [min(runs), max(runs)]
            assert min(runs) <= s[key] <= max(runs)
            assert s[key] == pytest.approx(sum(runs) / 2)  # the median of two
        first, second = (r["itl_quantiles_ms"] for r in row["repeats"])
        assert s["itl_quantiles_ms"] == pytest.approx([(a + b) / 2 for a, b in
                                                       zip(first, second)])
        _assert_itl(s, sum(r["output_len"] - 1 for r in row["samples"]))
        assert len(row["samples"]) == 3
    assert "Why the rows differ (3 requests, all arriving at t=0)" in proc.stdout
    assert re.search(r"^m2: up to 3 sequences at once \(M2 batching\): KV reserved", proc.stdout,
                     re.M)
    tokps = m2["summary"]["spread"]["output_tokens_per_s"]
    assert f"({report.fmt_number(tokps[0])}-{report.fmt_number(tokps[1])})" in proc.stdout

    # every stage with the bench (m1..m4) times each token; m4 runs with its own block size
    proc = run_compare("--milestones", "m2,m1,m3,m4:block_size=32", "--publish", "--no-plot",
                       *common,
                       env=dict(env, FOLOVLLM_GIT_COMMIT="f" * 40, FOLOVLLM_GIT_DIRTY="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"(from {path.name})" in proc.stderr
    assert re.search(r"estimate: ~\d+ s for m2 ~\d+ s, m1 ~\d+ s", proc.stderr)
    assert "m3, m4:block_size=32: not in" in proc.stderr
    (again,) = published.glob("*.json")
    assert len(list(scratch.glob("*.json"))) == 1
    results = report.load_results(again)
    assert results["published"] is True and "samples" in results["rows"][0]
    assert results["git_commit"] == "f" * 40 and results["git_dirty"] is False
    assert "repeats" not in results["rows"][0] and results["rows"][0]["summary"]["spread"] is None
    assert "published" in proc.stdout
    rows = {row["milestone"]: row for row in results["rows"]}
    assert list(rows) == ["m2", "m1", "m3", "m4:block_size=32"]
    assert [row["overrides"] for row in rows.values()] == [{}, {}, {}, {"block_size": 32}]
    assert rows["m3"]["summary"]["kv_cache"]["block_size"] == 16
    assert rows["m4:block_size=32"]["summary"]["kv_cache"]["block_size"] == 32
    assert results["config"]["engine"].get("block_size") is None  # the row's, not common
    for row in rows.values():
        _assert_itl(row["summary"], sum(s["output_len"] - 1 for s in row["samples"]))
    assert re.search(r"^m4:block_size=32: up to 3 sequences at once \(M4 flash attention\): "
                     r"KV in 32-token blocks", proc.stdout, re.M)


def test_destinations(tmp_path, monkeypatch):
    monkeypatch.setenv("FOLOVLLM_BENCH_SCRATCH", str(tmp_path / "s"))
    monkeypatch.setenv("FOLOVLLM_BENCH_RESULTS", str(tmp_path / "r"))
    parse = compare.build_parser().parse_args
    assert compare.out_dir_of(parse(["--milestones", "m1"])) == tmp_path / "s"
    assert compare.out_dir_of(parse(["--milestones", "m1", "--publish"])) == tmp_path / "r"
    assert compare.out_dir_of(parse(["--milestones", "m1", "--publish", "--out-dir",
                                     str(tmp_path / "o")])) == tmp_path / "o"
    monkeypatch.delenv("FOLOVLLM_BENCH_SCRATCH")
    monkeypatch.delenv("FOLOVLLM_BENCH_RESULTS")
    assert compare.scratch_dir() == REPO / "bench" / "scratch"
    assert compare.results_dir() == REPO / "bench" / "results"


def test_git_info_overrides(monkeypatch):
    monkeypatch.setenv("FOLOVLLM_GIT_COMMIT", "abc123")
    monkeypatch.delenv("FOLOVLLM_GIT_DIRTY", raising=False)
    assert compare.git_info() == ("abc123", None)
    monkeypatch.setenv("FOLOVLLM_GIT_DIRTY", "1")
    assert compare.git_info() == ("abc123", True)
    monkeypatch.setenv("FOLOVLLM_GIT_COMMIT", "abc123-dirty")
    monkeypatch.setenv("FOLOVLLM_GIT_DIRTY", "0")
    assert compare.git_info() == ("abc123", False)
    monkeypatch.delenv("FOLOVLLM_GIT_COMMIT")
    monkeypatch.delenv("FOLOVLLM_GIT_DIRTY")
    commit, dirty = compare.git_info()
    assert re.fullmatch(r"[0-9a-f]{40}", commit) and isinstance(dirty, bool)


@pytest.mark.parametrize("dirty, message", [
    ("1", "has uncommitted changes"), (None, "may have uncommitted changes")])
def test_publish_refuses_a_tree_with_uncommitted_changes(tmp_path, dirty, message):
    env = {"FOLOVLLM_BENCH_RESULTS": str(tmp_path / "r"), "FOLOVLLM_GIT_COMMIT": "a" * 40}
    if dirty is not None:
        env["FOLOVLLM_GIT_DIRTY"] = dirty
    proc = run_compare("--milestones", "m1", "--model", "dummy:tiny-llama", "--device",
                       "cpu", "--publish", env=env)
    assert proc.returncode == 2 and message in proc.stderr
    assert "--publish" in proc.stderr and not (tmp_path / "r").exists()


def test_combine_runs_takes_medians_and_keeps_the_spread():
    runs = []
    for tokps, at_once in ((30.0, 4), (10.0, 4), (20.0, 5)):
        s = dict.fromkeys(compare.SUMMARY_KEYS)
        s.update(output_tokens_per_s=tokps, ttft_p50_ms=1000 / tokps, max_concurrent_seqs=at_once,
                 kv_cache={"kind": "paged"})
        runs.append(s)
    combined = compare.combine_runs(runs)
    assert combined["output_tokens_per_s"] == 20.0 and combined["ttft_p50_ms"] == 50.0
    assert combined["spread"]["output_tokens_per_s"] == [10.0, 30.0]
    assert combined["spread"]["ttft_p50_ms"] == [1000 / 30, 100.0]
    assert combined["max_concurrent_seqs"] == 4 and combined["runs"] == 3
    assert combined["kv_cache"] == {"kind": "paged"} and combined["tpot_p50_ms"] is None
    one = compare.combine_runs(runs[:1])
    assert one["runs"] == 1 and one["spread"] is None and one["output_tokens_per_s"] == 30.0


def _earlier(tmp_path, name, workload, device="cpu", rates=None, date="2026-01-01T00:00:00Z"):
    rows = []
    for m, rate in (rates or {"m1": 10.0, "m2": 100.0}).items():
        summary = dict.fromkeys(SUMMARY_KEYS)
        summary.update(output_tokens_per_s=rate, total_time_s=5.0, runs=1)
        rows.append({"milestone": m, "note": "", "summary": summary, "wall_s": 8.0})
    data = {"workload": workload, "model": "default", "device": device, "date": date,
            "config": {"engine": {"dtype": "float32"}}, "rows": rows}
    (tmp_path / name).write_text(json.dumps(data))


def test_estimate_from_an_earlier_file(tmp_path):
    _earlier(tmp_path, "a.json", "latency", date="2026-03-01T00:00:00Z")
    _earlier(tmp_path, "b.json", "concurrent", rates={"m1": 20.0})
    _earlier(tmp_path, "c.json", "concurrent", device="cuda", date="2026-04-01T00:00:00Z")
    path, found = compare.earlier_results("default", "cpu", "float32", "concurrent", [tmp_path])
    assert path.name == "b.json"  # the same workload first, the same device only
    assert compare.earlier_results("default", "cpu", "bfloat16", "concurrent",
                                   [tmp_path]) is None
    assert compare.earlier_results("dummy:x", "cpu", "float32", "latency", [tmp_path]) is None

    # 200 tokens at 20 tok/s, plus 3 s of start-up (8 s of wall time, 5 s of work)
    lines = compare.estimate_lines(["m1", "m3"], "concurrent", 200, 1, (path, found), ["m1"])
    assert lines[0] == "estimate: ~13 s for m1 ~13 s (from b.json)"
    assert "one request at a time: m1" in lines[1]
    assert lines[2] == "  m3: not in b.json, so not in the estimate"
    assert not any("WARNING" in line for line in lines)

    path, found = compare.earlier_results("default", "cpu", "float32", "throughput", [tmp_path])
    assert path.name == "a.json"  # no throughput file: the newest of the others
    lines = compare.estimate_lines(["m1", "m2"], "throughput", 72_000, 2, (path, found), [])
    assert "a latency run: rough" in lines[0] and "~4.4 h" in lines[0]
    assert "2 runs" in lines[1] and "one request at a time: none" in lines[1]
    assert lines[-1].startswith("WARNING: this run should take about 4.4 h, over 10 minutes")

    lines = compare.estimate_lines(["m1", "hf"], "concurrent", 99, 1, None, ["m1"])
    assert lines == ["estimate: no earlier results file of this model and device to estimate "
                     "from; each row: 99 output tokens; one request at a time: m1"]
    assert compare.runs_one_at_a_time("m1", False, None)
    assert not compare.runs_one_at_a_time("m3", False, None)
    assert compare.runs_one_at_a_time("m3", True, None)
    assert compare.runs_one_at_a_time("hf", False, 1)
    assert not compare.runs_one_at_a_time("hf", False, None)


# -- workloads ------------------------------------------------------------------------
def test_workloads_are_reproducible_and_shaped():
    a = build_workload("throughput", 1000, seed=1, num_prompts=20)
    b = build_workload("throughput", 1000, seed=1, num_prompts=20)
    assert a.prompts == b.prompts and a.output_lens == b.output_lens
    assert all(100 <= len(p) <= 1024 for p in a.prompts)
    assert all(100 <= n <= 1024 for n in a.output_lens)
    assert all(0 <= t < 1000 for p in a.prompts for t in p)
    assert set(a.arrival_times) == {0.0}
    assert build_workload("throughput", 1000, seed=2, num_prompts=20).prompts != a.prompts

    online = build_workload("online", 1000, seed=0, num_prompts=200, request_rate=10.0)
    gaps = [y - x for x, y in zip(online.arrival_times, online.arrival_times[1:])]
    assert online.arrival_times[0] == 0.0 and min(gaps) >= 0
    assert 0.07 < sum(gaps) / len(gaps) < 0.13  # mean gap 1 / rate

    concurrent = build_workload("concurrent", 1000, seed=0)
    assert concurrent.num_prompts == 16 and set(concurrent.arrival_times) == {0.0}
    assert not concurrent.sequential
    assert all(32 <= len(p) <= 128 for p in concurrent.prompts)
    assert all(32 <= n <= 128 for n in concurrent.output_lens)

    prefix = build_workload("prefix", 1000, seed=0, num_prompts=4)
    assert prefix.prefix_len == 512
    assert all(len(p) == 512 + 32 and p[:512] == prefix.prompts[0][:512]
               for p in prefix.prompts)
    assert len({tuple(p[512:]) for p in prefix.prompts}) == 4
    assert set(prefix.output_lens) == {64}


# -- the roofline schedule ------------------------------------------------------------
# weights 100 B, 10 B of KV per token, 5 matmul parameters per token, no lm_head/attention
TOY = ModelCost(weight_bytes=100.0, kv_bytes_per_token=10.0, layer_matmul_params=5.0,
                lm_head_params=0.0, attn_flops_per_pair=0.0)


def test_roofline_memory_bound_by_hand():
    # prefill writes 3 tokens: 100 + 30; decodes read caches of 4 and 5 tokens
    one = simulate(TOY, [3], [3], [0.0], 1, bandwidth=1.0, matmul_rate=1e12)
    assert one["time_s"] == pytest.approx(130 + 140 + 150)
    assert one["steps"] == 3
    sequential = simulate(TOY, [3, 3], [3, 3], [0.0, 0.0], 1, 1.0, 1e12)
    assert sequential["time_s"] == pytest.approx(2 * 420)
    batched = simulate(TOY, [3, 3], [3, 3], [0.0, 0.0], 2, 1.0, 1e12)  # weights read once
    assert batched["time_s"] == pytest.approx(160 + 180 + 200)
    late = simulate(TOY, [3], [3], [10.0], 1, 1.0, 1e12)  # the clock waits for the arrival
    assert late["time_s"] == pytest.approx(10 + 420)


def test_roofline_compute_bound_and_shared_prefix():
    # 2 * 5 FLOPs per token: a 3-token prefill, then 2 decode tokens
    one = simulate(TOY, [3], [3], [0.0], 1, bandwidth=1e12, matmul_rate=1.0)
    assert one["flops"] == pytest.approx(50) and one["time_s"] == pytest.approx(50)
    plain = simulate(TOY, [10, 10], [1, 1], [0.0, 0.0], 2, 1e12, 1.0)
    shared = simulate(TOY, [10, 10], [1, 1], [0.0, 0.0], 2, 1e12, 1.0, prefix_len=8)
    assert plain["flops"] == pytest.approx(200)
    assert shared["flops"] == pytest.approx(100 + 20)  # the second computes 2 tokens only


def test_roofline_chat_turns_wait_for_the_turn_before_and_reuse_its_cache():
    # turn 0: a 3-token prompt, 2 out; turn 1 (6 tokens, 1 out) arrives when turn 0 ends,
    # with 4 of its tokens (turn 0's prompt and first reply token) already cached
    lens, outs, after, cached = [3, 6], [2, 1], [None, 0], [0, 4]
    chat = simulate(TOY, lens, outs, [0.0, 0.0], 2, 1.0, 1e12, after=after, cached_lens=cached)
    assert chat["steps"] == 3  # prefill turn 0, its decode, then turn 1's prefill
    assert chat["time_s"] == pytest.approx(130 + 140 + 160)
    together = simulate(TOY, lens, outs, [0.0, 0.0], 2, 1.0, 1e12)  # no turns: one prefill
    assert together["steps"] == 2
    late = simulate(TOY, lens, outs, [0.0, 5.0], 2, 1.0, 1e12, after=after, cached_lens=cached)
    assert late["time_s"] == pytest.approx(130 + 140 + 5 + 160)  # 5 s after turn 0 ended
    flops = simulate(TOY, lens, outs, [0.0, 0.0], 2, 1e12, 1.0, after=after, cached_lens=cached)
    assert flops["flops"] == pytest.approx(30 + 10 + 20)  # turn 1 computes 2 tokens only
    wl = build_workload("chat", 100, num_prompts=1, turns=2, input_len=3, output_len=2,
                        turn_len=1)
    assert wl.prompt_lens == [3, 6] and wl.cached_lens == cached


# -- report helpers -------------------------------------------------------------------
def _fake_results(workload: str, date: str, milestones: list[str], kv=None) -> dict:
    rows = []
    for i, m in enumerate(milestones):
        summary = dict.fromkeys(SUMMARY_KEYS)
        summary.update(ttft_mean_ms=10.0 * (i + 1), ttft_p50_ms=9.0, ttft_p99_ms=12.0,
                       output_tokens_per_s=100.0 * (i + 1), throughput_ratio=float(i + 1),
                       kv_cache=kv if i else None)
        rows.append({"milestone": m, "note": "a note" if i else "", "summary": summary,
                     "samples": []})
    return {"workload": workload, "model": "dummy:tiny-llama", "device": "cuda",
            "date": date, "machine": {"gpu": "NVIDIA H100 80GB HBM3", "cpu": "x",
                                      "cpu_count": 16, "hostname": "h"},
            "config": {"num_prompts": 8}, "roofline": None, "rows": rows}


def test_markdown_table_and_latest_results(tmp_path):
    kv = {"max_concurrent_seqs": 37, "reserved_token_slots": 4096,
          "used_token_slots_peak": 2500}
    files = {
        "old.json": _fake_results("throughput", "2026-01-01T00:00:00Z", ["m1", "m2"]),
        "new.json": _fake_results("throughput", "2026-02-01T00:00:00Z", ["m1", "m2"], kv),
        "lat.json": _fake_results("latency", "2026-03-01T00:00:00Z", ["m1", "hf"]),
    }
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    (tmp_path / "broken.json").write_text("{not json")

    names = [p.name for p in report.latest_results(results_dir=tmp_path)]
    assert names == ["lat.json", "new.json", "old.json"]
    assert [p.name for p in report.latest_results("throughput", results_dir=tmp_path)] == [
        "new.json", "old.json"]
    assert [p.name for p in report.latest_results(milestones=["hf"],
                                                  results_dir=tmp_path)] == ["lat.json"]
    assert report.latest_results("throughput", ["m3"], results_dir=tmp_path) == []

    md = report.markdown_table(report.load_results(tmp_path / "new.json"))
    assert "roofline" not in md  # a CPU run has no roofline column
    lines = md.splitlines()
    assert "NVIDIA H100 80GB HBM3" in lines[0] and "throughput" in lines[0]
    assert "2026-02-01" in lines[0]
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 2  # header, rule, one row per milestone
    assert table[0] == ("| milestone | at once | TTFT ms p50/p99 | TPOT ms p50/p99 | "
                        "output tok/s | vs first | peak MiB |")
    assert table[2].startswith("| m1 |") and "1.00x" in table[2]
    assert table[3].startswith("| m2 | 37 |") and "2.00x" in table[3]
    assert "| 9.00/12.0 |" in table[2]
    assert "- **m2**: up to 37 sequences at once (M2 batching): KV cache: max 37 seqs, 61% of " \
           "4096 slots" in md
    assert "note **m2**: a note" in md


def test_parse_bytes_and_percentile():
    assert parse_bytes("2GiB") == 2 * 2 ** 30
    assert parse_bytes("512MiB") == 512 * 2 ** 20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("4096") == 4096
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)


def test_tables_show_the_roofline_and_failed_rows():
    results = _fake_results("latency", "2026-02-01T00:00:00Z", ["m1", "m2"])
    results["roofline"] = {"bandwidth_gbps": 3000.0, "matmul_tflops": 700.0, "time_s": 2.5,
                           "bytes": 7.5e12, "flops": 1e12}
    results["rows"][0]["summary"]["roofline_fraction"] = 0.42
    results["rows"][1]["summary"] = dict.fromkeys(SUMMARY_KEYS)  # a failed row
    results["rows"][1]["note"] = "FAILED: RuntimeError: out of memory"
    md = report.markdown_table(results)
    header = next(line for line in md.splitlines() if line.startswith("| milestone"))
    assert header.rstrip().endswith("| roofline |")
    m1 = next(line for line in md.splitlines() if line.startswith("| m1 |"))
    assert m1.rstrip().endswith("| 42% |")
    m2 = next(line for line in md.splitlines() if line.startswith("| m2 |"))
    assert m2 == "| m2 | - | -/- | -/- | - | - | - | - |"
    assert "roofline 2.5 s (copy bandwidth 3000 GB/s" in md
    assert "FAILED: RuntimeError: out of memory" in md
    plain = report.plain_table(results)
    assert "roofline" in plain.splitlines()[1] and "42%" in plain
    assert "m2: no numbers, the row failed" in plain


def _row(milestone: str, **summary) -> dict:
    s = dict.fromkeys(SUMMARY_KEYS)
    s.update(summary)
    return {"milestone": milestone, "note": "", "summary": s, "samples": []}


def _five_rows() -> dict:
    """A CUDA run with a roofline, five rows, huge times and a spread: the widest table."""
    contiguous = {"kind": "contiguous", "num_slots": 5, "max_model_len": 4096,
                  "capacity_token_slots": 20480, "used_token_slots_peak": 778,
                  "max_concurrent_seqs": 5}
    paged = {"kind": "paged", "block_size": 16, "num_blocks": 1456,
             "capacity_token_slots": 23296, "reserved_token_slots_peak": 1957,
             "used_token_slots_peak": 1840, "max_concurrent_seqs": 16, "num_preemptions": 2}
    results = _fake_results("throughput", "2026-02-01T00:00:00Z", [])
    results["config"] = {"num_prompts": 256, "repeat": 3}
    results["roofline"] = {"bandwidth_gbps": 3000.0, "matmul_tflops": 700.0, "time_s": 2.5,
                           "bytes": 7.5e12, "flops": 1e12}
    spread = {"output_tokens_per_s": [1234.5, 99999.0]}
    results["rows"] = [
        _row("m1", ttft_p50_ms=3_550_173.0, ttft_p99_ms=7_200_000.0, tpot_p50_ms=42.0,
             tpot_p99_ms=12_345.0, output_tokens_per_s=20.04, throughput_ratio=1.0,
             peak_memory_mib=1326.4, roofline_fraction=0.0006, max_concurrent_seqs=1,
             spread={"output_tokens_per_s": [19.5, 20.5]}),
        _row("m2", ttft_p50_ms=7999.0, ttft_p99_ms=17_570.0, tpot_p50_ms=84.7, tpot_p99_ms=99.9,
             output_tokens_per_s=55555.5, throughput_ratio=2777.8, peak_memory_mib=123456.0,
             roofline_fraction=0.123, kv_cache=contiguous, spread=spread),
        _row("m3", ttft_p50_ms=2206.0, ttft_p99_ms=2206.0, tpot_p50_ms=106.0, tpot_p99_ms=145.0,
             output_tokens_per_s=69.6, throughput_ratio=3.47, peak_memory_mib=1326.0,
             roofline_fraction=0.5, kv_cache=paged,
             spread={"output_tokens_per_s": [60.1, 75.2]}),
        _row("m5", output_tokens_per_s=70.0, throughput_ratio=3.5, max_concurrent_seqs=16),
        _row("hf", ttft_p50_ms=1107.0, ttft_p99_ms=1107.0, tpot_p50_ms=81.0, tpot_p99_ms=91.4,
             output_tokens_per_s=454.0, throughput_ratio=0.82, max_concurrent_seqs=64),
    ]
    return results


def test_plain_table_fits_120_columns_and_prints_long_times_in_seconds():
    results = _five_rows()
    plain = report.plain_table(results)
    assert max(len(line) for line in plain.splitlines()) <= 120, plain
    header = next(line for line in plain.splitlines() if line.startswith("milestone"))
    # one unit per time column: seconds, since some TTFT and TPOT values reach 10 s
    assert header.split() == ["milestone", "at", "once", "TTFT", "s", "p50/p99", "TPOT", "s",
                              "p50/p99", "output", "tok/s", "vs", "first", "peak", "MiB",
                              "roofline"]
    m1 = next(line for line in plain.splitlines() if line.startswith("m1 "))
    assert "1 (one at a time)" in m1 and "3550/7200" in m1 and "0.042/12.3" in m1
    assert "20.0 (19.5-20.5)" in m1 and "1.00x" in m1 and "0.06%" in m1
    assert "55556 (1234-99999)" in plain
    assert "3550173" not in plain
    m2 = next(line for line in plain.splitlines() if line.startswith("m2 "))
    assert " 5 " in m2 and "8.00/17.6" in m2
    assert "median of 3 runs" in plain
    md = report.markdown_table(results)
    header = next(line for line in md.splitlines() if line.startswith("| milestone"))
    assert header.count("|") == 9  # eight columns with the roofline


def test_time_columns_have_one_unit():
    results = _five_rows()
    assert report.time_unit(results, "ttft") == "s"  # m1's TTFT is over 10 s
    results["rows"] = [r for r in results["rows"] if r["milestone"] in ("m3", "hf")]
    assert report.time_unit(results, "ttft") == "ms"  # every value under 10 s
    assert report.fmt_time(None, "ms") == "-"
    assert report.fmt_time(42.04, "ms") == "42.0"
    assert report.fmt_time(9999.0, "ms") == "9999"
    assert report.fmt_time(355_173.0, "s") == "355"
    assert report.fmt_time(42.0, "s") == "0.042"


def test_why_lines_come_from_the_run():
    results = _five_rows()
    header, m1, m2, m3, m5, hf = report.why_lines(results)
    assert header.startswith("Why the rows differ (256 requests, all arriving at t=0)")
    assert m1 == "m1: one request at a time (M1 basic: no batching)"
    assert m2 == ("m2: up to 5 sequences at once (M2 batching): KV reserved whole at "
                  "max_model_len, 5 slots x 4096 tokens (all in use: the limit); 3.8% of it "
                  "held tokens at peak")
    assert m3 == ("m3: up to 16 sequences at once (M3 paged KV): KV in 16-token blocks taken "
                  "as sequences grow; 8.4% of 23296 slots held at peak; 2 preemptions (the "
                  "cache was full)")
    # a later stage with no KV stats: what the registry says it adds, no code change
    assert m5 == (f"m5: up to 16 sequences at once (M5 chunked prefill): "
                  f"{report.stages.get('m5').adds}")
    assert hf.startswith("hf: up to 64 sequences at once (transformers generate): static")
    results["workload"] = "latency"
    results["rows"][2]["summary"]["kv_cache"]["max_concurrent_seqs"] = 1
    results["rows"][2]["summary"]["max_concurrent_seqs"] = None
    assert report.why_lines(results)[0].startswith(
        "Why the rows differ (256 requests sent one at a time")
    assert report.why_lines(results)[3] == (
        "m3: one request at a time (M3 paged KV; the latency workload sends no more)")


def test_why_header_says_what_sets_these_rows_apart():
    """The header under a table says something true of that table: batching only where
    the rows ran different numbers of sequences at once."""
    results = _five_rows()  # 1, 5, 16, 16 and 64 at once
    assert "running more at once gives more tokens/s" in report.why_header(results)
    for row in results["rows"]:
        row["summary"]["max_concurrent_seqs"] = 32
        row["summary"]["kv_cache"] = None
    header = report.why_header(results)
    assert header == ("Why the rows differ (256 requests, all arriving at t=0): every row ran "
                      "up to 32 sequences at once, so batching does not set them apart; they "
                      "differ in what a step with that many sequences costs.")
    for row in results["rows"]:
        row["summary"]["max_concurrent_seqs"] = 1
    assert "every row ran one sequence at a time" in report.why_header(results)
    results.update(workload="online", config={"num_prompts": 200, "request_rate": 10.0})
    assert report.why_header(results).startswith(
        "Why the rows differ (200 requests arriving at random, 10 per second): a row that "
        "keeps up produces tokens as fast as the requests ask for them")


def test_bar_labels_fit_under_their_bars():
    """Rows with settings show them under the stage when they fit, else a letter and a
    key; rows with the same settings share the letter."""
    names = ["m4", "m5", "m5:max_num_batched_tokens=4096", "m5:enable_chunked_prefill=false"]
    assert report.bar_labels(names, fit=40) == (
        ["m4", "m5", "m5\nmax_num_batched_tokens=4096", "m5\nenable_chunked_prefill=false"], "")
    assert report.bar_labels(names, fit=13) == (
        ["m4", "m5", "m5 (a)", "m5 (b)"],
        "(a) max_num_batched_tokens=4096, (b) enable_chunked_prefill=false")
    same = ["m5:enable_chunked_prefill=false", "m6:enable_chunked_prefill=false:block_size=32",
            "m6:enable_chunked_prefill=false"]
    assert report.bar_labels(same, fit=8)[0] == ["m5 (a)", "m6 (b)", "m6 (a)"]
    assert report.bar_labels(["m1", "hf"], fit=3) == (["m1", "hf"], "")


def test_plot_says_hatched_only_when_a_bar_is(tmp_path, monkeypatch):
    """The plot's legend says "hatched" only when a row ran one request at a time (its bar
    is hatched), and spells out the settings of rows too long to name under their bars."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    titles = []
    real = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda fig, text, **kw: titles.append(text) or real(fig, text, **kw))
    results = _five_rows()  # m1 ran one at a time
    compare.plot(results, tmp_path / "a.png")
    assert "hatched: one request at a time" in titles[-1]
    results["rows"] = [r for r in results["rows"] if r["milestone"] != "m1"]
    results["rows"][0]["milestone"] = "m2:max_num_batched_tokens=4096"
    compare.plot(results, tmp_path / "b.png")
    assert "hatched" not in titles[-1]
    assert "(a) max_num_batched_tokens=4096" in titles[-1]


def test_at_once_reads_older_files():
    old = {"workload": "throughput", "config": {"num_prompts": 64}}
    kv_row = _row("m2", kv_cache={"max_concurrent_seqs": 16})
    assert report.at_once(old, kv_row) == 16
    noted = dict(_row("m1"), note="one request at a time (m1 has no batching)")
    assert report.at_once(old, noted) == 1
    hf = dict(_row("hf", output_tokens_per_s=1.0), note="static batches of up to 256 prompts")
    assert report.at_once(old, hf) == 64
    assert report.at_once(old, _row("m3")) is None
    assert report.at_once({"workload": "latency"}, _row("m3")) == 1
    assert report.at_once_text(None) == "-" and report.at_once_text(1) == "1 (one at a time)"


def test_plot_panels_say_which_way_is_better(tmp_path):
    pytest.importorskip("matplotlib")
    results = _five_rows()
    titles = [title for _, title in compare.plot_panels(results)]
    assert titles == ["output tokens/s\n(higher is better)", "TTFT p50 (s)\n(lower is better)",
                      "TPOT p50 (ms)\n(lower is better)",
                      "sequences at once\n(more = more batching)"]
    path = compare.plot(results, tmp_path / "p.png")
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    assert 800 <= width <= 1000 and height < width


# -- inter-token latency ----------------------------------------------------------------
def test_itl_from_known_token_times():
    # request a: tokens at 0.1, 0.2, 0.35 s (gaps 100, 150 ms); b: a step gave two tokens
    a, b = [0.1, 0.2, 0.35], [0.05, 0.05, 0.1]
    assert compare.itl_gaps(a) == pytest.approx([0.1, 0.15])
    assert compare.itl_gaps([0.3]) == [] and compare.itl_gaps(None) is None
    s = compare.itl_summary([a, b, [0.3]])  # a one-token request has no gap
    assert s["itl_gaps"] == 4
    assert s["itl_mean_ms"] == pytest.approx(75.0)  # (100 + 150 + 0 + 50) / 4
    assert s["itl_max_ms"] == pytest.approx(150.0)
    assert s["itl_p50_ms"] == pytest.approx(75.0)  # between 50 and 100
    assert s["itl_p99_ms"] == pytest.approx(148.5)
    q = s["itl_quantiles_ms"]
    assert len(q) == 101 and q == sorted(q)
    assert q[0] == pytest.approx(0.0) and q[100] == pytest.approx(150.0)
    assert q[25] == pytest.approx(37.5)
    assert q == pytest.approx([compare.percentile([0.0, 50.0, 100.0, 150.0], p)
                               for p in range(101)])
    assert compare.itl_per_request(a) == pytest.approx({"itl_mean_s": 0.125,
                                                        "itl_max_s": 0.15})
    assert compare.itl_per_request([0.3]) == {"itl_mean_s": None, "itl_max_s": None}
    # one untimed request: no ITL for the run rather than a partial one; none to pool
    assert set(compare.itl_summary([a, None]).values()) == {None}
    assert set(compare.itl_summary(None).values()) == {None}
    none = compare.itl_summary([[0.3], [0.2]])
    assert none["itl_gaps"] == 0 and none["itl_p99_ms"] is None


def test_worker_token_times():
    # one stamp per token, after the arrival at 10 s; a step that gave two: equal stamps
    assert worker.token_times([10.5, 10.5, 10.75], 3, 10.0) == [0.5, 0.5, 0.75]
    assert worker.token_times([10.5], 1, 10.0) == [0.5]
    # every token out of one step (a stage that does not stream), or a stamp missing
    assert worker.token_times([11.0, 11.0, 11.0], 3, 10.0) is None
    assert worker.token_times([10.5, 10.75], 3, 10.0) is None


def test_summary_without_token_times_and_combined_quantiles():
    result = {"samples": [{"prompt_len": 4, "output_len": 3, "ttft_s": 0.1, "tpot_s": 0.05,
                           "e2e_s": 0.2}], "total_time_s": 1.0, "peak_memory_mib": 1.0}
    s = compare.summarize(result)  # a worker result from before the ITL
    assert set(s) == set(compare.SUMMARY_KEYS) and s["itl_p99_ms"] is None
    runs = []
    for scale in (1.0, 3.0, 2.0):
        run = dict.fromkeys(compare.SUMMARY_KEYS)
        run.update(itl_p99_ms=10.0 * scale, itl_gaps=7,
                   itl_quantiles_ms=[scale * q for q in range(101)])
        runs.append(run)
    combined = compare.combine_runs(runs)
    assert combined["itl_quantiles_ms"] == [2.0 * q for q in range(101)]  # element-wise
    assert combined["itl_p99_ms"] == 20.0 and combined["spread"]["itl_p99_ms"] == [10.0, 30.0]
    assert combined["itl_gaps"] == 7
    runs[1]["itl_quantiles_ms"] = None  # a run without: no curve rather than a mixed one
    assert compare.combine_runs(runs)["itl_quantiles_ms"] is None


# -- rows with their own engine settings -------------------------------------------------
def test_milestone_specs_with_settings():
    rows = compare.resolve_milestones("m3, M3:block_size=32:gpu_memory_utilization=0.5 ,hf")
    assert [(m.name, m.package, m.overrides) for m in rows] == [
        ("m3", "m3_paged_kv", {}),
        ("m3:block_size=32:gpu_memory_utilization=0.5", "m3_paged_kv",
         {"block_size": 32, "gpu_memory_utilization": 0.5}),
        ("hf", None, {})]
    assert rows[1].stage == "m3"
    # values read as --engine-arg reads them: JSON when it parses, else a string
    assert compare.parse_overrides("m4:attention_backend=torch:kv_cache_memory=null") == (
        "m4", {"attention_backend": "torch", "kv_cache_memory": None})
    assert compare.runs_one_at_a_time("m1:seed=3", False, None)
    assert not compare.runs_one_at_a_time("m3:block_size=32", False, None)


@pytest.mark.parametrize("spec, message", [
    ("m3:no_such_knob=1", "'m3:no_such_knob=1': m3 (m3_paged_kv) has no EngineConfig "
                          "setting no_such_knob; it has model,"),
    ("m3:block_size", "'m3:block_size': 'block_size' is not KEY=VALUE"),
    ("m3:", "'m3:': '' is not KEY=VALUE"),
    ("m3:9x=1", "'9x=1' is not KEY=VALUE"),
    ("m3:block_size=8:block_size=16", "block_size is set twice"),
    ("m3:block_size=3", "m3's EngineConfig rejects it: block_size: must be a power of two"),
    ("hf:seed=1", "hf has no EngineConfig to change"),
    ("m3:block_size=32,m3:block_size=32", "'m3:block_size=32' is listed twice"),
    ("m9:seed=1", "unknown milestone 'm9'"),
])
def test_milestone_spec_errors(spec, message):
    with pytest.raises(compare.BenchError, match=re.escape(message)):
        compare.resolve_milestones(spec)


# -- the ITL in the report ---------------------------------------------------------------
def _with_itl(results: dict, rows: dict[str, float]) -> dict:
    """Give the named rows an ITL (percentiles 0..100 of `scale` ms each, a long tail)."""
    for row in results["rows"]:
        scale = rows.get(row["milestone"])
        if scale is not None:
            quantiles = [scale * q for q in range(100)] + [scale * 1000]
            row["summary"].update(itl_mean_ms=scale * 50, itl_p50_ms=quantiles[50],
                                  itl_p99_ms=quantiles[99], itl_max_ms=quantiles[100],
                                  itl_quantiles_ms=quantiles, itl_gaps=1234)
    return results


def test_tables_without_itl_are_as_before_and_with_it_add_a_table():
    old = _five_rows()  # a file from before the ITL: no ITL keys at all
    for row in old["rows"]:
        for key in compare.ITL_KEYS:
            row["summary"].pop(key, None)
    before = report.markdown_table(old)
    assert "ITL" not in before and "ITL" not in report.plain_table(old)
    assert not report.has_itl(old)

    results = _with_itl(_five_rows(), {"m1": 0.5, "m3": 2.0, "hf": 0.01})
    md = report.markdown_table(results)
    assert md.startswith(before.split("\n\nWhy the rows differ")[0])  # the main table
    itl = md.split("Inter-token latency (ITL)")[1].split("\n\n")[1].splitlines()
    assert itl[0] == ("| milestone | ITL mean ms | ITL p50 ms | ITL p99 ms | ITL max ms | "
                      "gaps |")
    assert itl[2] == "| m1 | 25.0 | 25.0 | 49.5 | 500 | 1234 |"
    assert itl[5] == "| m5 | - | - | - | - | - |"  # a row without ITL, or a failed one
    assert len(itl) == 2 + 5
    results["rows"][2]["summary"]["itl_max_ms"] = 25_000.0  # one value over 10 s: seconds
    plain = report.plain_table(results)
    assert max(len(line) for line in plain.splitlines()) <= 120
    assert re.search(r"^milestone +ITL mean s +ITL p50 s +ITL p99 s +ITL max s +gaps$",
                     plain, re.M)
    assert re.search(r"^m3 +0\.100 +0\.100 +0\.198 +25\.0 +1234$", plain, re.M)


def test_plot_panels_add_itl_p99_when_the_file_has_it(tmp_path):
    pytest.importorskip("matplotlib")
    results = _with_itl(_five_rows(), {"m1": 0.5, "hf": 0.01})
    titles = [title for _, title in compare.plot_panels(results)]
    assert titles[3] == "ITL p99 (ms)\n(lower is better)"
    assert titles[-1].startswith("sequences at once") and len(titles) == 5
    assert compare.plot_panels(results)[3][0] == [49.5, None, None, None, 0.99]


def test_itl_cdf_plot_and_its_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    results = _with_itl(_five_rows(), {"m1": 0.5, "m3": 2.0})
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    assert [name for name, _, _ in report.itl_curves(results)] == ["m1", "m3"]
    png = report.plot_itl_cdf(results, tmp_path / "cdf.png")
    width, height = struct.unpack(">II", png.read_bytes()[16:24])
    assert width == 900 and height < width
    with pytest.raises(ValueError, match="no row has ITL percentiles"):
        report.plot_itl_cdf(_five_rows(), tmp_path / "none.png")

    assert report.main(["--itl-cdf", str(path), "--rows", "m3", "--scale", "log"]) == 0
    assert (tmp_path / "r-itl-cdf.png").is_file()  # next to the results file
    assert report.main(["--itl-cdf", str(path), "--rows", "m9", "--out",
                        str(tmp_path / "x.png")]) == 2
    assert "no row m9" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        report.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--itl-cdf RESULTS.json" in out and "--out PNG" in out and "--rows" in out


# -- the chat workload ---------------------------------------------------------------------
def test_chat_workload_draws_first_prompts_user_messages_and_lengths():
    wl = build_workload("chat", 1000, seed=5, num_prompts=3, turns=4, input_len=20,
                        output_len=(4, 9), turn_len=(2, 6))
    assert (wl.num_prompts, wl.num_conversations, wl.turns) == (12, 3, 4)
    assert wl.turn_len == [2, 6] and wl.input_len == [20, 20] and not wl.sequential
    assert [wl.turn_of(i) for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [wl.previous(i) for i in range(6)] == [None, 0, 1, 2, None, 4]
    assert [wl.next_turn(i) for i in range(6)] == [1, 2, 3, None, 5, 6]
    for i, p in enumerate(wl.prompts):  # a first prompt, or a later turn's user message
        assert len(p) == 20 if wl.turn_of(i) == 0 else 2 <= len(p) <= 6
    assert len({len(p) for i, p in enumerate(wl.prompts) if wl.turn_of(i)}) > 1
    assert all(4 <= n <= 9 for n in wl.output_lens) and set(wl.arrival_times) == {0.0}
    # a turn's whole prompt: the turn before's, its reply (exactly its output length) and
    # the new user message
    lens = wl.prompt_lens
    for i in range(wl.num_prompts):
        j = wl.previous(i)
        assert lens[i] == (20 if j is None else lens[j] + wl.output_lens[j] + len(wl.prompts[i]))
    assert wl.cached_lens[:2] == [0, 20 + wl.output_lens[0] - 1]
    # the seed alone fixes the user messages: every row gets the same; another seed, others
    again = build_workload("chat", 1000, seed=5, num_prompts=3, turns=4, input_len=20,
                           output_len=(4, 9), turn_len=(2, 6))
    assert again.prompts == wl.prompts and again.output_lens == wl.output_lens
    assert build_workload("chat", 1000, seed=6, num_prompts=3, turns=4, input_len=20,
                          output_len=(4, 9), turn_len=(2, 6)).prompts != wl.prompts
    assert Workload.from_dict(json.loads(json.dumps(wl.to_dict()))) == wl  # the worker's copy

    defaults = build_workload("chat", 1000)
    assert (defaults.num_conversations, defaults.turns) == (16, 4)
    assert {len(p) for i, p in enumerate(defaults.prompts) if i % 4 == 0} == {256}
    assert {len(p) for i, p in enumerate(defaults.prompts) if i % 4} == {64}
    assert set(defaults.output_lens) == {128}
    single = build_workload("concurrent", 1000, num_prompts=3)  # one turn per request
    assert single.turns == 1 and single.prompt_lens == [len(p) for p in single.prompts]
    assert single.cached_lens == [0, 0, 0] and single.next_turn(0) is None


def test_chat_turn_prompt_is_previous_prompt_reply_and_user_message():
    wl = build_workload("chat", 1000, seed=1, num_prompts=2, turns=3, input_len=6,
                        output_len=2, turn_len=3)
    first = wl.turn_prompt(3)  # conversation 1, turn 0: its first prompt, a copy
    assert first == wl.prompts[3] and first is not wl.prompts[3]
    second = wl.turn_prompt(4, first, [7, 8])
    assert second == first + [7, 8] + wl.prompts[4] and len(second) == wl.prompt_lens[4]
    third = wl.turn_prompt(5, second, (9, 9))
    assert third == second + [9, 9] + wl.prompts[5] and len(third) == wl.prompt_lens[5]
    with pytest.raises(ValueError, match="needs the previous turn's prompt and reply"):
        wl.turn_prompt(4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="concurrent", turns=2), "turns and turn_len apply to the chat workload only"),
    (dict(name="prefix", turn_len=8), "turns and turn_len apply to the chat workload only"),
    (dict(name="chat", turns=0), "turns: must be >= 1, got 0"),
    (dict(name="chat", turn_len=(5, 2)), "turn_len: need 1 <= low <= high, got 5..2"),
])
def test_chat_workload_refusals(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_workload(vocab_size=1000, **kwargs)


def _chat_2x2() -> Workload:
    return build_workload("chat", TINY_VOCAB, seed=2, num_prompts=2, turns=2, input_len=8,
                          output_len=3, turn_len=5)


def _record_m5_engine(monkeypatch) -> list[tuple[str, str, list[int]]]:
    """("add", request id, prompt) and ("done", request id, reply), in the order the m5
    engine saw them."""
    from m5_chunked_prefill.engine.llm_engine import LLMEngine

    events = []
    add, step = LLMEngine.add_request, LLMEngine.step

    @functools.wraps(add)  # keeps the signature: the driver looks for arrival_time
    def recording_add(self, request_id, prompt, *args, **kwargs):
        events.append(("add", request_id, list(prompt)))
        return add(self, request_id, prompt, *args, **kwargs)

    def recording_step(self):
        outputs = step(self)
        events.extend(("done", o.request_id, list(o.outputs[0].token_ids))
                      for o in outputs if o.finished)
        return outputs

    monkeypatch.setattr(LLMEngine, "add_request", recording_add)
    monkeypatch.setattr(LLMEngine, "step", recording_step)
    return events


def _run_m5_chat(monkeypatch) -> tuple[Workload, list, dict]:
    """The stage driver on m5 and a tiny CPU model, 2 conversations x 2 turns: the
    workload, what the engine saw (timed requests only) and the worker's result."""
    wl = _chat_2x2()
    events = _record_m5_engine(monkeypatch)
    result = worker.run_stage({
        "milestone": "m5", "package": "m5_chunked_prefill", "workload": wl.to_dict(),
        "engine": {"model": "dummy:tiny-llama", "device": "cpu", "dtype": "float32",
                   "seed": 0}, "device": "cpu", "progress": False, "overrides": {}})
    return wl, [event for event in events if not event[1].startswith("warmup")], result


def test_chat_driver_sends_each_turn_its_conversation_so_far(monkeypatch):
    """Both first turns at t=0, each second turn only after its first finished, its prompt
    the first turn's prompt, the reply m5 generated and the workload's user message; four
    samples with the right lengths."""
    wl, timed, result = _run_m5_chat(monkeypatch)
    sent = {rid: tokens for kind, rid, tokens in timed if kind == "add"}
    replies = {rid: tokens for kind, rid, tokens in timed if kind == "done"}
    assert sorted(sent) == sorted(replies) == [f"bench-{i}" for i in range(4)]
    assert [rid for _, rid, _ in timed[:2]] == ["bench-0", "bench-2"]  # both at t=0
    for first, second in ((0, 1), (2, 3)):
        a, b = f"bench-{first}", f"bench-{second}"
        assert sent[a] == wl.prompts[first] and len(replies[a]) == 3
        assert sent[b] == sent[a] + replies[a] + wl.prompts[second]
        assert timed.index(("done", a, replies[a])) < timed.index(("add", b, sent[b]))

    samples = result["samples"]
    assert [s["prompt_len"] for s in samples] == wl.prompt_lens == [8, 16, 8, 16]
    assert [(s["conversation"], s["turn"]) for s in samples] == [(0, 0), (0, 1), (1, 0),
                                                                 (1, 1)]
    assert [s["output_len"] for s in samples] == [3] * 4
    assert all(0 < s["ttft_s"] <= s["e2e_s"] for s in samples)
    assert all(len(t) == 3 for t in result["token_times_s"])
    assert "num_cached_tokens" not in samples[0]  # m5 has no prefix cache
    assert "prefix_cache_queries" not in result["kv_cache"]
    assert result["note"] == ("no prefix cache in m5: every turn computes its whole "
                              "conversation again")


def test_chat_hf_row_sends_the_same_turns_as_a_stage(monkeypatch, tmp_path):
    """The hf row builds each later turn from its own reply; on CPU in fp32 its greedy
    replies are m5's, so it sends exactly the prompts m5 sent."""
    wl = _chat_2x2()
    built = {}  # request -> the whole prompt the hf driver built for it
    turn_prompt = Workload.turn_prompt

    def recording_turn_prompt(self, i, *args):
        built[i] = turn_prompt(self, i, *args)
        return built[i]

    _, timed, _ = _run_m5_chat(monkeypatch)
    m5_sent = {rid: tokens for kind, rid, tokens in timed if kind == "add"}
    monkeypatch.setattr(Workload, "turn_prompt", recording_turn_prompt)
    compare.prepare_hf_folder("dummy:tiny-llama", "m5_chunked_prefill", "float32", 0, tmp_path)
    result = worker.run_hf({"milestone": "hf", "workload": wl.to_dict(), "device": "cpu",
                            "dtype": "float32", "hf_path": str(tmp_path),
                            "hf_batch_size": None, "progress": False})
    assert [built[i] for i in range(4)] == [m5_sent[f"bench-{i}"] for i in range(4)]
    samples = result["samples"]
    assert [s["prompt_len"] for s in samples] == wl.prompt_lens
    assert [(s["conversation"], s["turn"], s["output_len"]) for s in samples] == [
        (0, 0, 3), (0, 1, 3), (1, 0, 3), (1, 1, 3)]
    assert result["max_concurrent_seqs"] == 2  # one turn per conversation at once
    assert "computes its whole conversation again (no prefix cache)" in result["note"]


def test_chat_end_to_end_records_turns(tmp_path):
    proc = run_compare("--milestones", "m5", "--workload", "chat", "--model",
                       "dummy:tiny-llama", "--device", "cpu", "--num-prompts", "2", "--turns",
                       "2", "--input-len", "8", "--output-len", "3", "--turn-len", "5",
                       "--threads", "1", "--no-progress", "--no-plot", "--out-dir",
                       str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "chat workload, 2 conversations x 2 turns (4 requests) (input 8..16" in proc.stderr
    (path,) = tmp_path.glob("chat-dummy-tiny-llama-cpu-*.json")
    results = report.load_results(path)
    cfg = results["config"]
    assert cfg["num_prompts"] == 4 and cfg["conversations"] == 2 and cfg["turns"] == 2
    assert cfg["input_len"] == [8, 8] and cfg["turn_len"] == [5, 5]
    assert cfg["turn_prompt_lens"] == [[8, 16], [8, 16]]
    assert cfg["turn_output_lens"] == [[3, 3], [3, 3]]
    (row,) = results["rows"]
    assert [(s["conversation"], s["turn"], s["prompt_len"], s["output_len"])
            for s in row["samples"]] == [(0, 0, 8, 3), (0, 1, 16, 3), (1, 0, 8, 3),
                                         (1, 1, 16, 3)]
    assert set(row["summary"]) == SUMMARY_KEYS and row["summary"]["prefix_cache_queries"] is None
    _assert_itl(row["summary"], 4 * 2)
    out = proc.stdout
    assert "chat workload, 2 conversations x 2 turns (4 requests), model dummy:tiny-llama" in out
    assert "Prefix cache:" not in out  # no row with a prefix cache: no table
    assert "Why the rows differ (2 conversations of 2 turns, all starting at t=0" in out

    other = build_workload("concurrent", TINY_VOCAB)
    assert compare.chat_config(other) == dict.fromkeys(
        ("conversations", "turns", "turn_len", "turn_prompt_lens", "turn_output_lens"))


# -- the prefix cache's statistics -----------------------------------------------------------
def test_timed_prefix_cache_counts_leave_out_the_warm_up():
    kv = {"kind": "paged", "prefix_cache_queries": 1008, "prefix_cache_hits": 600,
          "prefix_cache_hit_rate": 600 / 1008}
    warmup = {"kind": "paged", "prefix_cache_queries": 8, "prefix_cache_hits": 0}
    timed = worker.timed_kv_stats(kv, warmup)
    assert timed == dict(kv, prefix_cache_queries=1000, prefix_cache_hit_rate=0.6)
    assert kv["prefix_cache_queries"] == 1008  # the engine's own dict is left alone
    assert worker.timed_kv_stats({"kind": "paged"}, None) == {"kind": "paged"}  # before M6
    assert worker.timed_kv_stats(None, None) is None
    off = {"prefix_cache_queries": 0, "prefix_cache_hits": 0, "prefix_cache_hit_rate": None}
    assert worker.timed_kv_stats(off, off)["prefix_cache_hit_rate"] is None

    result = {"samples": [{"prompt_len": 4, "output_len": 3, "ttft_s": 0.1, "tpot_s": 0.05,
                           "e2e_s": 0.2}], "total_time_s": 1.0, "peak_memory_mib": 1.0,
              "kv_cache": timed}
    s = compare.summarize(result)
    assert (s["prefix_cache_queries"], s["prefix_cache_hits"]) == (1000, 600)
    assert s["prefix_cache_hit_rate"] == 0.6
    assert compare.summarize(dict(result, kv_cache=None))["prefix_cache_hit_rate"] is None
    runs = [dict(s, prefix_cache_hits=h, prefix_cache_hit_rate=h / 1000) for h in (600, 500, 700)]
    combined = compare.combine_runs(runs)
    assert combined["prefix_cache_hits"] == 600 and combined["prefix_cache_hit_rate"] == 0.6
    assert combined["spread"]["prefix_cache_hit_rate"] == [0.5, 0.7]


def _with_prefix_rows(results: dict) -> dict:
    """Add an m6 row with a prefix cache (87.5% hits) and one with it off (no lookups)."""
    results["rows"].insert(4, _row("m6", output_tokens_per_s=90.0, throughput_ratio=4.5,
                                   max_concurrent_seqs=16, prefix_cache_queries=16384,
                                   prefix_cache_hits=14336, prefix_cache_hit_rate=0.875))
    results["rows"].insert(5, _row("m6:enable_prefix_caching=false", max_concurrent_seqs=16,
                                   output_tokens_per_s=80.0, prefix_cache_queries=0,
                                   prefix_cache_hits=0, prefix_cache_hit_rate=None))
    return results


def test_prefix_cache_table_shows_a_dash_for_rows_without_it():
    old = _five_rows()  # no row with a prefix cache (every file before M6): no table
    assert not report.has_prefix_cache(old)
    assert "Prefix cache" not in report.markdown_table(old) + report.plain_table(old)
    results = _with_prefix_rows(_five_rows())
    assert report.has_prefix_cache(results)
    md = report.markdown_table(results)
    header = next(line for line in md.splitlines() if line.startswith("| milestone"))
    assert "prefix" not in header and header.endswith("| peak MiB | roofline |")  # as before
    table = md.split(report.PREFIX_TEXT)[1].split("\n\n")[1].splitlines()
    assert table[0] == "| milestone | prompt tokens looked up | found cached | hit rate |"
    assert table[2:] == ["| m1 | - | - | - |", "| m2 | - | - | - |", "| m3 | - | - | - |",
                         "| m5 | - | - | - |", "| m6 | 16384 | 14336 | 88% |",
                         "| m6: enable_prefix_caching=false | 0 | 0 | - |",
                         "| hf | - | - | - |"]
    plain = report.plain_table(results)
    prefix_lines = plain.split("Prefix cache:")[1].split("\n\n")[0].splitlines()
    assert len(prefix_lines) == 2 + 2 + 7 and max(map(len, prefix_lines)) <= 120
    assert re.search(r"^milestone +prompt tokens looked up +found cached +hit rate$", plain,
                     re.M)
    assert re.search(r"^m6 +16384 +14336 +88%$", plain, re.M)
    assert re.search(r"^m1 +- +- +-$", plain, re.M)
    why = report.why_lines(results)
    assert why[5] == (f"m6: up to 16 sequences at once (M6 prefix cache): "
                      f"{report.stages.get('m6').adds}; prefix cache: 88% of 16384 prompt "
                      "tokens found cached")
    assert why[6].endswith("; prefix cache: no lookups")
    assert report.hit_rate_text({"prefix_cache_hit_rate": 0.0}) == "0%"
    assert report.hit_rate_text({}) == "-"
    # a summary without the keys: read from its KV stats
    kv = {"prefix_cache_queries": 10, "prefix_cache_hits": 5, "prefix_cache_hit_rate": 0.5}
    assert report.prefix_cache_stats({"kv_cache": kv}) == (10, 5, 0.5)
    assert report.prefix_cache_stats({"kv_cache": None}) == (None, None, None)


def test_report_prints_a_results_file(tmp_path, capsys):
    path, other = tmp_path / "r.json", tmp_path / "profile.json"
    path.write_text(json.dumps(_with_prefix_rows(_five_rows())))
    other.write_text(json.dumps({"what": "a step profile", "machine": "x"}))
    assert report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("throughput workload, 256 prompts") and report.PREFIX_TEXT[:30] in out
    assert re.search(r"^m6 +16384 +14336 +88%$", out, re.M)
    assert report.main([str(path), "--markdown", "--rows", "m1,m6"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("`throughput` workload")
    rows = [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| m")]
    assert rows == ["| milestone", "| m1", "| m6"] * 2  # the main and prefix-cache tables
    assert "| m6 | 16384 | 14336 | 88% |" in md
    assert report.main([str(other)]) == 2
    assert "not a results file of bench/compare.py" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        report.main([])
    assert exit_.value.code == 2
    assert "one of the arguments RESULTS.json --itl-cdf is required" in capsys.readouterr().err


def test_published_results_files_still_render():
    """The committed files predate the prefix cache: they print, with no hit-rate column."""
    paths = report.latest_results()
    if not paths:
        pytest.skip("no published results in this checkout")
    for path in paths:
        results = report.load_results(path)
        plain = report.plain_table(results)
        assert plain.startswith(f"{results['workload']} workload")
        if not report.has_prefix_cache(results):
            assert "Prefix cache" not in plain


def test_weights_table_compares_the_gptq_layers_with_their_unquantized_size():
    """M7 rows report what the weights take; the table shows the GPTQ layers' share."""
    results = {"rows": [
        {"milestone": "m6", "summary": {"weights": {"total": 3 * 2**20}}},
        {"milestone": "m7:quantization=gptq",
         "summary": {"weights": {"total": 2 * 2**20, "quantized": 2**19, "dense": 2**21}}},
        {"milestone": "hf", "summary": {"weights": None}}]}
    assert report.has_quantized_weights(results)
    headers, rows = report.weights_table_rows(results)
    assert headers[0] == "milestone" and headers[-1] == "ratio"
    assert rows[0] == ["m6", "3.0", "-", "-", "-"]
    assert rows[1] == ["m7:quantization=gptq", "2.0", "0.5", "2.0", "0.250x"]
    assert rows[2] == ["hf", "-", "-", "-", "-"]
    assert not report.has_quantized_weights({"rows": results["rows"][:1]})


@pytest.mark.parametrize("package", ["m2_batching", "m3_paged_kv", "m6_prefix_cache"])
def test_a_latency_run_reports_one_sequence_at_once_after_a_wide_warm_up(monkeypatch,
                                                                          package):
    """The CUDA warm-up sends a batch at once; the timed requests of a latency run go one
    at a time, so the peaks the row reports are the timed run's: 1 at once, no more KV
    slots than one request holds, and no preemption."""
    wl = build_workload("latency", vocab_size=256, num_prompts=2, input_len=8, output_len=3)
    monkeypatch.setattr(worker, "warmup_prompts",
                        lambda wl, vocab, device: [list(range(1, 9))] * 4)
    result = worker.run_stage({
        "milestone": package[:2], "package": package, "workload": wl.to_dict(),
        "engine": {"model": "dummy:tiny-llama", "device": "cpu", "dtype": "float32",
                   "seed": 0}, "device": "cpu", "progress": False, "overrides": {}})
    assert result["max_concurrent_seqs"] == 1
    assert result["kv_cache"]["max_concurrent_seqs"] == 1
    assert result["kv_cache"]["used_token_slots_peak"] <= 8 + 3
    assert result["kv_cache"].get("num_preemptions", 0) == 0


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu"], "--gpu-memory-gib is a budget of the GPU's memory (CUDA only)"),
    (["--kv-cache-memory", "1GiB"], "leave out --kv-cache-memory"),
    (["--engine-arg", "gpu_memory_utilization=0.5"],
     "leave out --engine-arg gpu_memory_utilization"),
    (["--milestones", "m7,m7:kv_cache_memory=1000000"],
     "'m7:kv_cache_memory=1000000' sets kv_cache_memory, but --gpu-memory-gib 24"),
])
def test_a_memory_budget_is_for_cuda_and_sets_the_memory_alone(args, message):
    argv = ["--milestones", "m7", "--model", "dummy:tiny-llama", "--gpu-memory-gib", "24",
            *args]
    with pytest.raises(compare.BenchError, match=re.escape(message)):
        compare._run(compare.build_parser().parse_args(argv), argv)


def test_a_memory_budget_is_a_share_of_the_card():
    assert compare.budget_utilization(24, 80 * 2**30) == pytest.approx(0.3)
    with pytest.raises(compare.BenchError, match="the card has 16.0 GiB in all"):
        compare.budget_utilization(24, 16 * 2**30)
    for bad in ("0", "-1", "nan", "lots"):
        with pytest.raises(compare.argparse.ArgumentTypeError):
            compare.parse_gib(bad)
    assert compare.build_parser().parse_args(
        ["--milestones", "m7", "--gpu-memory-gib", "7.5"]).gpu_memory_gib == 7.5


def test_a_memory_budget_reaches_every_stage_row_and_the_kv_table(tmp_path, monkeypatch):
    """On a (faked) 80 GiB card, --gpu-memory-gib 24 gives each stage row
    gpu_memory_utilization 0.3; the file records the budget and the card; the summary
    shows each row's KV tokens, how many longest sequences fit and the most at once."""
    import torch

    specs = []

    def fake_worker(spec, scratch, label):
        specs.append(spec)
        quant = spec["overrides"].get("quantization") == "gptq"
        tokens = 4096 if quant else 1024
        return {"samples": [_sample(100, 28), _sample(60, 20)], "total_time_s": 1.0,
                "peak_memory_mib": 1.0, "max_concurrent_seqs": 2 if quant else 1,
                "note": "", "gpu": "Fake GPU",
                "weights": {"total": (1 if quant else 4) * 2**30},
                "kv_cache": {"kind": "paged", "block_size": 16, "num_preemptions": 0,
                             "capacity_token_slots": tokens,
                             "kv_cache_bytes": tokens * 2**18}}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(compare, "measure_roofline", lambda *a: (
        "Fake GPU", {"bandwidth_gbps": 1.0, "matmul_tflops": 1.0, "time_s": 0.1,
                     "bytes": 1, "flops": 1}, 80 * 2**30))
    monkeypatch.setattr(compare, "run_worker", fake_worker)
    argv = ["--milestones", "m7,m7:quantization=gptq", "--model", "dummy:tiny-llama",
            "--device", "cuda", "--gpu-memory-gib", "24", "--num-prompts", "2",
            "--out-dir", str(tmp_path), "--no-plot", "--no-progress"]
    assert compare._run(compare.build_parser().parse_args(argv), argv) == 0
    assert [s["engine"]["gpu_memory_utilization"] for s in specs] == [pytest.approx(0.3)] * 2
    results = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert results["config"]["gpu_memory_gib"] == 24
    assert results["config"]["engine"]["gpu_memory_utilization"] == pytest.approx(0.3)
    assert results["machine"]["gpu_memory_bytes"] == 80 * 2**30
    assert "a memory budget of 24 GiB per row" in report.caption(results)
    headers, rows = report.kv_table_rows(results)
    assert headers == ["milestone", "weights MiB", "KV MiB", "KV tokens", "longest fit",
                       "max at once", "preemptions"]
    assert rows == [["m7", "4096", "256", "1024", "8", "1", "0"],  # 1024 // (100 + 28)
                    ["m7:quantization=gptq", "1024", "1024", "4096", "32", "2", "0"]]
    plain = report.plain_table(results)
    assert "KV cache under a memory budget of 24 GiB per row" in plain
    assert re.search(r"^m7:quantization=gptq +1024 +1024 +4096 +32 +2 +0$", plain, re.M)
    assert "KV tokens" not in report.plain_table(dict(results, config={}))  # no budget


def _sample(prompt_len: int, output_len: int) -> dict:
    return {"prompt_len": prompt_len, "output_len": output_len, "ttft_s": 0.01,
            "tpot_s": 0.001, "e2e_s": 0.05}
