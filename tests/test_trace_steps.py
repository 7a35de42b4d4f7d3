"""The step tracer (tools/trace_steps.py): who a real engine runs in each step, and how.

Tooling for M5 (chunked prefill). On the CPU with a tiny dummy model and a token budget
of 16: M5 cuts a long prompt into chunks that fit the budget beside the running decodes,
and gives its first token only with its last chunk; M4 runs it whole, alone, over the
budget, and the decodes wait. Also checks the timeline plot, the command line, and the
docs marker that draws a committed trace at build time.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUDGET = 16
LONG = 50  # the long prompt: more than three budgets
# two requests decoding, the long prompt at step 2, a short one at step 3
ARRIVALS = [(0, 6, 12), (0, 7, 12), (2, LONG, 2), (3, 5, 3)]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_trace_{name}",
                                                  REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return _load_tool("trace_steps")


@pytest.fixture(scope="module")
def traces(tool):
    """m4's and m5's traces of ARRIVALS at a budget of BUDGET tokens."""
    return {stage: tool.trace_steps(stage, ARRIVALS, "dummy:tiny-llama", device="cpu",
                                    max_num_batched_tokens=BUDGET)
            for stage in ("m4", "m5")}


def _prefill(row: dict, request_id: str) -> list[tuple[dict, dict]]:
    """(step, the request's entry in it) for every step that ran its prompt or a chunk."""
    return [(step, s) for step in row["steps"] for s in step["seqs"]
            if s["request_id"] == request_id and s["kind"] != "decode"]


def test_m5_chunks_the_long_prompt_beside_the_decodes(traces):
    row = traces["m5"]
    assert row["chunked_prefill"] and row["budget"] == BUDGET
    assert all(step["num_tokens"] <= BUDGET for step in row["steps"])
    long = _prefill(row, "r2")
    assert len(long) >= 3 and all(s["kind"] == "chunk" for _, s in long)
    # the chunks follow one another and cover the prompt; no token before the last one
    starts = [s["num_computed_before"] for _, s in long]
    sizes = [s["num_new_tokens"] for _, s in long]
    assert starts == [sum(sizes[:i]) for i in range(len(sizes))] and sum(sizes) == LONG
    assert [s["token"] for _, s in long] == [False] * (len(long) - 1) + [True]
    # every chunk ran beside both decodes, which got their token in that step
    for step, _ in long:
        decodes = [s for s in step["seqs"] if s["kind"] == "decode"]
        assert {s["request_id"] for s in decodes} == {"r0", "r1"}
        assert all(s["token"] and s["num_new_tokens"] == 1 for s in decodes)


def test_m4_runs_the_long_prompt_whole_and_alone(traces):
    row = traces["m4"]
    assert not row["chunked_prefill"]
    ((step, long),) = _prefill(row, "r2")
    assert long["kind"] == "prompt" and long["num_new_tokens"] == LONG and long["token"]
    assert step["num_tokens"] == LONG > step["budget"]
    assert [s["request_id"] for s in step["seqs"]] == ["r2"]  # no decode in it


def test_same_tokens_and_the_stalls_in_steps(tool, traces):
    m4, m5 = traces["m4"], traces["m5"]
    assert m4["outputs"] == m5["outputs"]  # greedy: the schedule changes no token
    assert all(len(m4["outputs"][f"r{i}"]) == n for i, (_, _, n) in enumerate(ARRIVALS))
    stats4 = {s["request_id"]: s for s in tool.request_stats(m4)}
    stats5 = {s["request_id"]: s for s in tool.request_stats(m5)}
    for rid in ("r0", "r1"):  # the decodes wait for M4's prefills, never for M5's chunks
        assert stats4[rid]["longest_stall_steps"] >= 1
        assert stats5[rid]["stalled_steps"] == 0
    # the long prompt's first token: at once in M4, after all its chunks in M5
    assert stats4["r2"]["steps_to_first_token"] == 0
    assert stats5["r2"]["steps_to_first_token"] == len(_prefill(m5, "r2")) - 1


def test_plot_timeline_writes_a_png(tool, traces, tmp_path):
    path = tool.plot_timeline([traces["m4"], traces["m5"]], tmp_path / "t.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert tool.panel_title(traces["m5"]).startswith("M5: one token budget per step")
    assert tool.panel_title(dict(traces["m5"], row="m5:enable_chunked_prefill=false",
                                 chunked_prefill=False)) == \
        "M5 (enable_chunked_prefill=false): prefills first, whole prompts"


def test_cli_help_and_bad_arguments(tool, capsys):
    script = str(REPO_ROOT / "tools" / "trace_steps.py")
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True,
                           text=True, timeout=60, check=False)
    assert shown.returncode == 0 and "--stages" in shown.stdout and "--png" in shown.stdout
    for bad in (["--stages", "m1"], ["--stages", "m5:no_such_setting=1"],
                ["--requests", "0:10"]):
        assert tool.main(bad) == 2, bad
        assert capsys.readouterr().err.startswith("error: --"), bad


def test_main_writes_the_trace_with_its_provenance(tool, tmp_path, capsys):
    out = tmp_path / "trace.json"
    assert tool.main(["--stages", "m5:enable_chunked_prefill=false", "--budget", "8",
                      "--requests", "0:4:2,1:12:1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["command"].startswith("python tools/trace_steps.py --stages")
    assert results["git_commit"] and results["machine"]["cpu_count"]
    assert results["scenario"] == [{"arrival_step": 0, "prompt_len": 4, "max_tokens": 2},
                                   {"arrival_step": 1, "prompt_len": 12, "max_tokens": 1}]
    (row,) = results["rows"]
    assert row["row"] == "m5:enable_chunked_prefill=false" and not row["chunked_prefill"]
    assert row["engine_args"]["max_num_batched_tokens"] == 8
    assert "m5:enable_chunked_prefill=false" in capsys.readouterr().out


def test_step_timeline_marker_draws_the_committed_trace(traces, tmp_path, monkeypatch):
    pytest.importorskip("mkdocs")
    hooks = _load_tool("mkdocs_hooks")
    monkeypatch.setenv("FOLOVLLM_RESULTS_DIR", str(tmp_path))
    name = "trace-steps-test.json"
    (tmp_path / name).write_text(json.dumps({
        "command": "python tools/trace_steps.py --stages m4,m5 --out x.json --png x.png",
        "git_commit": "abcdef1234" + "0" * 30, "git_dirty": False,
        "date": "2026-11-26T00:00:00Z", "machine": {"cpu": "test cpu", "cpu_count": 2},
        "versions": {}, "model": "dummy:tiny-llama", "rows": list(traces.values())}))
    page = SimpleNamespace(file=SimpleNamespace(src_uri="m5_chunked_prefill.md"))

    def render(text: str) -> str:
        return hooks.on_page_markdown(text, page, None, None)

    image = "](bench-results/trace-steps-test-m4-m5-timeline.png)"
    shown = render(f"<!-- step-timeline: file=bench/results/{name} rows=m4,m5 -->")
    assert "![Step timeline of m4 and m5: " in shown and image in shown
    assert "measured at commit `abcdef1234`" in shown
    assert "python tools/trace_steps.py --stages m4,m5\n" in shown  # no --out, --png
    assert "](bench-results/trace-steps-test-timeline.png)" in render(
        f"<!-- step-timeline: file={name} -->")
    with pytest.raises(ValueError, match="no results file nothing.json"):
        render("<!-- step-timeline: file=bench/results/nothing.json -->")
    with pytest.raises(ValueError, match="no row m7"):
        render(f"<!-- step-timeline: file={name} rows=m7 -->")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "m5_chunked_prefill.md").write_text(
        f"<!-- step-timeline: file={name} rows=m4,m5 -->\n"
        "<!-- step-timeline: file=missing.json -->\n")
    plots = hooks.step_timelines(docs)
    assert list(plots) == ["trace-steps-test-m4-m5-timeline.png"]
    assert plots["trace-steps-test-m4-m5-timeline.png"].startswith(b"\x89PNG")
