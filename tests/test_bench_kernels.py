"""The kernel benchmark (bench/attention_kernels.py), the step profiler (tools/profile_step.py)
and the host-time tool (tools/host_step.py) on the CPU: their smoke runs end to end, the
JSON they write, the table printer, the goal summary, and the profiler-event bookkeeping
on made-up events.

Introduced with M4. The real numbers come from a GPU; these check that the scripts work.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import attention_kernels  # noqa: E402
from bench.provenance import format_table  # noqa: E402

PROVENANCE_KEYS = {"command", "git_commit", "git_dirty", "date", "machine", "versions"}


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


profile_step = _load_tool("profile_step")
host_step = _load_tool("host_step")


def _run(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, FOLOVLLM_GIT_COMMIT="abc123", FOLOVLLM_GIT_DIRTY="1")
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("script, words", [
    ("bench/attention_kernels.py", ["--interpret-smoke", "--quick", "--out"]),
    ("tools/profile_step.py", ["--stages", "--batches", "--m4-eager", "--steps", "--device"]),
])
def test_help(script, words):
    proc = _run(script, "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    for word in words:
        assert word in proc.stdout


def test_kernels_interpret_smoke_writes_the_json(tmp_path):
    out = tmp_path / "k.json"
    proc = _run("bench/attention_kernels.py", "--interpret-smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "meaningless" in proc.stdout
    data = json.loads(out.read_text())
    assert PROVENANCE_KEYS <= set(data)
    assert data["git_commit"] == "abc123" and data["git_dirty"] is True
    assert "--interpret-smoke" in data["command"]
    assert {"gpu", "sm_count", "cpu"} <= set(data["machine"])
    assert {"torch", "triton", "cuda"} <= set(data["versions"])
    assert data["interpret_smoke"] is True and data["timings_meaningful"] is False
    assert data["copy_bandwidth_gbps"] > 0
    kinds = {r["kind"] for r in data["rows"]}
    assert kinds == {"decode", "prefill"}
    for row in data["rows"]:
        assert row["ok"], row
        assert row["max_abs_err"] < 1e-3 and row["kernel_us"] > 0
    decode = [r for r in data["rows"] if r["kind"] == "decode"]
    assert all(r["num_splits"] >= 1 and r["gbps"] > 0 and "m3_us" in r for r in decode)
    prefill = [r for r in data["rows"] if r["kind"] == "prefill"]
    assert all(r["sdpa_ok"] and r["ratio_vs_sdpa"] > 0 for r in prefill)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_kernels_refuses_without_cuda(tmp_path):
    proc = _run("bench/attention_kernels.py", "--out", str(tmp_path / "k.json"), timeout=60)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr
    assert not (tmp_path / "k.json").exists()


def _decode_row(**kw):
    row = {"kind": "decode", "model": "qwen2.5-0.5b", "batch": 64, "context": 1024,
           "num_splits": 3, "kernel_us": 55.5, "gbps": 2400.0, "copy_fraction": 0.8,
           "max_abs_err": 0.004, "m3_us": 900.0, "m3_metadata_us": 300.0,
           "m3_speedup": 16.2, "ok": True}
    row.update(kw)
    return row


def test_table_printer_formats_rows():
    rows = [_decode_row(), _decode_row(batch=256, ok=False, max_abs_err=0.5),
            _decode_row(batch=1, context=4096, skipped="too big", kernel_us=None),
            {"kind": "decode", "model": "qwen3-0.6b", "batch": 16, "context": 512,
             "ok": False, "error": "RuntimeError: boom"},
            {"kind": "prefill", "model": "qwen3-0.6b", "prompts": 4, "prompt_len": 512,
             "kernel_us": 120.0, "tflops": 150.0, "max_abs_err": 0.01, "sdpa_us": 100.0,
             "sdpa_tflops": 180.0, "ratio_vs_sdpa": 0.83, "sdpa_max_abs_err": 0.008,
             "ok": True}]
    decode = attention_kernels.decode_table(rows).splitlines()
    assert decode[0].split()[:3] == ["model", "batch", "ctx"]
    assert len(decode) == 2 + 4  # header, rule, one line per decode row
    assert "80.0" in decode[2] and decode[2].rstrip().endswith("ok")
    assert decode[3].rstrip().endswith("WRONG")
    assert decode[4].rstrip().endswith("skipped") and decode[5].rstrip().endswith("ERROR")
    prefill = attention_kernels.prefill_table(rows).splitlines()
    assert len(prefill) == 3 and "4x512" in prefill[2] and "0.83" in prefill[2]
    assert all(len(line) <= 120 for line in decode + prefill)


def test_format_table_fits_120_columns():
    long = "x" * 300
    text = format_table(["name", "a", "b"], [[long, 1, None], ["short", 22, 3.5]])
    lines = text.splitlines()
    assert all(len(line) <= 120 for line in lines)
    assert lines[2].startswith("xxx") and "~" in lines[2] and lines[2].endswith("-")
    assert lines[3].split() == ["short", "22", "3.5"]


def test_goals_take_the_rows_that_decide_them():
    rows = [_decode_row(copy_fraction=0.7), _decode_row(context=4096, copy_fraction=0.55),
            _decode_row(batch=1, copy_fraction=0.1),  # batch 1 does not count
            {"kind": "prefill", "ratio_vs_sdpa": 0.9}, {"kind": "prefill", "ratio_vs_sdpa": 0.8}]
    goals = attention_kernels.goals(rows)
    assert goals["decode_copy_fraction"]["min"] == 0.55
    assert goals["decode_copy_fraction"]["met"] is False
    assert goals["prefill_vs_sdpa"]["min"] == 0.8 and goals["prefill_vs_sdpa"]["met"] is True
    assert attention_kernels.goals([])["decode_copy_fraction"]["met"] is None


def test_causal_flops():
    # one prompt of 3 tokens: 1 + 2 + 3 = 6 visible pairs, 4 FLOPs x heads x head_dim each
    assert attention_kernels.causal_flops([3], heads=2, head_dim=8) == 6 * 4 * 2 * 8
    assert attention_kernels.causal_flops([3, 1], 1, 1) == 4 * (6 + 1)


def test_profile_step_cpu_smoke(tmp_path):
    out = tmp_path / "p.json"
    proc = _run("tools/profile_step.py", "--device", "cpu", "--stages", "m3_paged_kv",
                "--batches", "1,2", "--model", "dummy:tiny-llama", "--steps", "3",
                "--warmup", "1", "--prompt-len", "40", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert PROVENANCE_KEYS <= set(data) and data["git_commit"] == "abc123"
    assert data["device"] == "cpu" and data["machine"]["gpu"] is None
    rows = data["rows"]
    assert [(r["row"], r["batch"]) for r in rows] == [("m3_paged_kv", 1), ("m3_paged_kv", 2)]
    for r in rows:
        assert "error" not in r, r
        assert r["wall_ms"] > 0 and r["cpu_ms"] > 0 and len(r["wall_ms_per_step"]) == 3
        assert r["gpu_ms"] is None and r["gpu_busy"] is None and r["kernels_per_step"] is None
        assert r["blocked_ms"] == 0 and r["num_preemptions"] == 0
        assert r["cpu_ms_profiled"] > 0 and r["top_cpu_ops"]
        assert all(op["self_us_per_step"] > 0 for op in r["top_cpu_ops"])
        assert r["prefill_steps"] >= 1
    assert "wall ms" in proc.stdout and "m3_paged_kv" in proc.stdout


def test_profile_step_rows_and_errors():
    parse = profile_step.parse_rows
    assert parse("m3,m4_flash_attn:eager", False) == [("m3_paged_kv", None),
                                                      ("m4_flash_attn", "eager")]
    assert parse("m3_paged_kv,m4", True) == [("m3_paged_kv", None), ("m4_flash_attn", None),
                                             ("m4_flash_attn", "eager")]
    for bad in ("m9", "m3:fast", "m0", ""):
        with pytest.raises(profile_step.UsageError):
            parse(bad, False)
    assert profile_step.parse_batches("1, 64,256") == [1, 64, 256]
    with pytest.raises(profile_step.UsageError):
        profile_step.parse_batches("0")
    proc = _run("tools/profile_step.py", "--stages", "m9", timeout=60)
    assert proc.returncode == 2 and "unknown stage" in proc.stderr


class _Event:
    """A stand-in for the profiler's kineto event."""

    def __init__(self, name, start, dur, gpu=False, activity=None):
        self._name, self._start, self._dur, self._gpu = name, start, dur, gpu
        self._activity = activity or ("kernel" if gpu else
                                      "cuda_runtime" if name.startswith("cu") else "cpu_op")

    def name(self):
        return self._name

    def start_ns(self):
        return self._start

    def duration_ns(self):
        return self._dur

    def device_type(self):
        return "DeviceType.CUDA" if self._gpu else "DeviceType.CPU"

    def activity_type(self):
        return self._activity


def test_split_steps_counts_kernels_and_blocked_time():
    mark = profile_step.STEP_MARK
    events = [
        _Event(mark, 0, 1000, activity="user_annotation"),
        _Event(mark, 2000, 1000, activity="user_annotation"),
        _Event(mark, 0, 1000, gpu=True, activity="gpu_user_annotation"),  # ignored
        _Event("aten::mm", 10, 50),
        _Event("cudaLaunchKernel", 20, 5),
        _Event("gemm", 100, 300, gpu=True), _Event("triton_attn", 450, 100, gpu=True),
        _Event("cudaMemcpyAsync", 200, 40),  # host to device: not blocking
        _Event("Memcpy HtoD (Pageable -> Device)", 210, 5, gpu=True, activity="gpu_memcpy"),
        _Event("cudaMemcpyAsync", 600, 350),  # waits for the device-to-host copy
        _Event("Memcpy DtoH (Device -> Pageable)", 900, 20, gpu=True, activity="gpu_memcpy"),
        _Event("cudaGraphLaunch", 2010, 30),
        _Event("gemm", 2100, 200, gpu=True),
        _Event("cudaStreamSynchronize", 2050, 400),
        _Event("cudaMemcpy", 2500, 100),  # synchronous: blocking
    ]
    parsed = profile_step.split_steps(events)
    first, second = parsed["steps"]
    assert (first["kernels"], first["kernel_ns"], first["blocked_ns"]) == (2, 400, 350)
    assert (second["kernels"], second["kernel_ns"], second["blocked_ns"]) == (1, 200, 500)
    assert second["graph_launches"] == 1 and first["graph_launches"] == 0
    assert parsed["by_name"] == {"gemm": [500, 2], "triton_attn": [100, 1]}


def test_host_step_times_the_host_with_the_model_left_out(monkeypatch, capsys):
    """The stand-in replaces every forward pass (prefills too), the steps still sample
    and apply tokens, and the host's time is part of the step's."""
    built = []

    def never_forward(*args):
        raise AssertionError("the model's forward pass ran")

    def build(*args):
        engine = real_build(*args)
        engine.model_runner.model.register_forward_pre_hook(never_forward)
        built.append(engine)
        return engine

    real_build = host_step.build_engine
    monkeypatch.setattr(host_step, "build_engine", build)
    args = host_step.parse_args(["--stages", "m4", "--batch", "3", "--steps", "2",
                                 "--repeats", "1", "--prompt-len", "8"])
    result = host_step.one_run("m4_flash_attn", args)
    assert 0 < result["host_ms"] <= result["step_ms"]
    (engine,) = built
    # prefill's token, three warm-up steps' and the two timed ones: six tokens each
    assert [s.num_output_tokens for s in engine.sequences.values()] == [6, 6, 6]
    for bad in (["--stages", "m3"], ["--batch", "0"], ["--stages", "m9"]):
        with pytest.raises(SystemExit):
            host_step.parse_args(bad)
    assert "m3" in capsys.readouterr().err
