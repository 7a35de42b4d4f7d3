"""The bench harness: end to end on CPU with a tiny dummy model, its errors, the roofline
schedule and the report helpers.

Introduced with the bench (M1).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import report  # noqa: E402
from bench.compare import parse_bytes, percentile  # noqa: E402
from bench.roofline import ModelCost, simulate  # noqa: E402
from bench.workloads import build_workload  # noqa: E402

SUMMARY_KEYS = {"ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms", "tpot_mean_ms", "tpot_p50_ms",
                "tpot_p99_ms", "e2e_mean_s", "e2e_p50_s", "e2e_p99_s", "output_tokens_per_s",
                "requests_per_s", "total_time_s", "peak_memory_mib", "throughput_ratio",
                "roofline_fraction", "kv_cache"}
TINY_VOCAB = 512  # dummy:tiny-llama


def run_compare(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "compare.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


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
    assert {"python", "torch", "transformers", "triton", "git_commit"} <= set(
        results["versions"])
    cfg = results["config"]
    assert cfg["num_prompts"] == 3 and cfg["seed"] == 3 and cfg["input_len"] == [8, 8]
    assert cfg["engine"]["dtype"] == "float32"

    expected = build_workload(workload, TINY_VOCAB, seed=3, num_prompts=3, input_len=8,
                              output_len=4 if output_len == "4" else (2, 6)).output_lens
    assert [r["milestone"] for r in results["rows"]] == ["m1", "hf"]
    for row in results["rows"]:
        assert set(row["summary"]) == SUMMARY_KEYS
        assert [s["output_len"] for s in row["samples"]] == expected
        for s in row["samples"]:
            assert s["prompt_len"] == 8
            assert 0 < s["ttft_s"] <= s["e2e_s"] and s["tpot_s"] >= 0
        summary = row["summary"]
        assert summary["output_tokens_per_s"] == pytest.approx(
            sum(expected) / summary["total_time_s"])
        assert summary["peak_memory_mib"] > 0 and summary["roofline_fraction"] is None
    first, hf = (row["summary"] for row in results["rows"])
    assert first["throughput_ratio"] == 1.0
    assert hf["throughput_ratio"] == pytest.approx(
        hf["output_tokens_per_s"] / first["output_tokens_per_s"])
    if workload == "throughput":
        assert cfg["engine"]["max_batch_size"] == 2
        assert "one request at a time" in results["rows"][0]["note"]
        assert "no max_batch_size (ignored)" in results["rows"][0]["note"]
        assert "batches of up to 2 prompts" in results["rows"][1]["note"]
    else:
        assert results["rows"][0]["note"] == ""

    out = proc.stdout
    assert "TTFT ms (mean/p50/p99)" in out and "output tok/s" in out
    assert re.search(r"^m1 .* 1\.00x\s*$", out, re.M)
    assert re.search(r"^hf .*x\s*$", out, re.M)


@pytest.mark.parametrize("args, message", [
    (["--milestones", "m1,m9"], "unknown milestone 'm9'"),
    (["--milestones", "m1,vllm"], "unknown milestone 'vllm'"),
    (["--milestones", "m0,m1"], "'m0' (m0_init) cannot generate"),
    (["--milestones", "m1,m1"], "listed twice"),
    (["--milestones", "m1", "--workload", "bursty"], "invalid choice: 'bursty'"),
    (["--milestones", "m1", "--kv-cache-memory", "lots"], "is not a size"),
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
    assert table[2].startswith("| m1 |") and "1.00x" in table[2]
    assert table[3].startswith("| m2 |") and "2.00x" in table[3]
    assert "max 37 seqs, 61% of 4096 slots" in table[3]
    assert "| 10.0/9.00/12.0 |" in table[2]
    assert "**m2**: a note" in md


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
    assert m2 == "| m2 | -/-/- | -/-/- | -/-/- | - | - | - | - | - | - |"
    assert "roofline 2.5 s (copy bandwidth 3000 GB/s" in md
    assert "FAILED: RuntimeError: out of memory" in md
    plain = report.plain_table(results)
    assert "roofline" in plain.splitlines()[1] and "42%" in plain
