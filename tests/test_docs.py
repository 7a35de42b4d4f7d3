"""The docs tooling: the generated stage diff, and the site built with --strict.

Introduced with the docs site (M1). Checks that `tools/stage_diff.py` prints real hunks
of the files that differ between stages, that the mkdocs hook renders bench results
through `bench/report.py` (or says there are none), and that `mkdocs build --strict`
passes with the stage pages showing diffs generated from the current code.
"""

import html
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGE_DIFF = REPO_ROOT / "tools" / "stage_diff.py"


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env=env)


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def _text(fragment: str) -> str:
    """The visible text of an HTML fragment: tags removed, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def _page_text(path: Path) -> str:
    """The visible text of a built page."""
    return _text(path.read_text(encoding="utf-8"))


def test_stage_diff_cli_prints_real_hunks():
    result = _run(str(STAGE_DIFF), "m0_init", "m1_basic")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # A file new in M1 appears as an addition from /dev/null, with its source lines.
    assert "--- /dev/null\n+++ m1_basic/engine/llm_engine.py\n" in out
    engine_src = (REPO_ROOT / "m1_basic/engine/llm_engine.py").read_text().splitlines()
    assert f"@@ -0,0 +1,{len(engine_src)} @@" in out
    assert "+class LLMEngine:" in out
    # A modified file shows its hunks with both sides.
    assert "--- m0_init/worker/model_runner.py\n+++ m1_basic/worker/model_runner.py\n" in out
    assert "+    def allocate_kv_cache(self, seq: Sequence, max_len: int) -> None:" in out
    assert re.search(r"^-    def forward\(self, token_ids: list\[int\]\) -> torch\.Tensor:$",
                     out, re.M)
    # Files that are the same in both stages, and caches, are not in the diff.
    assert "config.py" not in re.findall(r"^\+\+\+ m1_basic/(\S+)", out, re.M)
    assert "__pycache__" not in out and ".pyc" not in out


def test_stage_diff_matches_the_files():
    stage_diff = _load_tool("stage_diff")
    diffs = {d.path: d for d in stage_diff.stage_diff("m0_init", "m1_basic")}
    m0 = set(stage_diff.stage_files("m0_init"))
    m1 = set(stage_diff.stage_files("m1_basic"))
    assert {p for p, d in diffs.items() if d.status == "added"} == m1 - m0
    changed = {p for p in m0 & m1
               if (REPO_ROOT / "m0_init" / p).read_text() != (REPO_ROOT / "m1_basic" / p).read_text()}
    assert {p for p, d in diffs.items() if d.status == "modified"} == changed
    for d in diffs.values():  # the +/- counts agree with the lines shown
        assert d.added == sum(1 for line in d.lines[2:] if line.startswith("+"))
        assert d.added + d.removed > 0


def test_stage_diff_html_puts_the_lesson_first():
    stage_diff = _load_tool("stage_diff")
    old, new = "m2_batching", "m3_paged_kv"
    diffs = stage_diff.stage_diff(old, new)
    lesson = stage_diff.read_lesson(new)
    out = stage_diff.format_html(old, new, diffs, lesson)
    assert f"<code>python tools/stage_diff.py {old} {new}</code>" in out
    blocks = re.findall(r'<details id="([^"]+)"([^>]*)>', out)
    key = [stage_diff.anchor(e.path) for e in lesson.entries if e.key]
    rest = [stage_diff.anchor(e.path) for e in lesson.entries if not e.key]
    # One block per changed file: the idea's files first, in LESSON order and marked;
    # every block closed (a page leads with its idea, not with pages of code).
    assert [anchor for anchor, _ in blocks] == key + rest
    assert [attrs for _, attrs in blocks] == (
        [' class="stage-diff stage-diff-idea"'] * len(key) + [' class="stage-diff"'] * len(rest))
    assert f"The first {len(key)} carry the idea" in out
    assert "Click a file to open its diff." in out and "<table>" not in out
    assert "diff-core-block_pool-py" in key
    # Each summary line says why its file changed.
    summaries = re.findall(r"<summary>(.*?)</summary>", out, re.S)
    for entry, summary in zip([e for e in lesson.entries if e.key]
                              + [e for e in lesson.entries if not e.key], summaries):
        assert entry.path in summary and entry.why.replace("`", "") in _text(summary)
    # Lines are highlighted by Pygments and escaped; the text is the CLI's diff exactly.
    # The code is kept out of the search index (tools/search_check.py: its tokens break
    # the theme's search); the summary lines are not.
    assert out.count('<div class="highlight" data-search-exclude><pre><code>') == len(blocks)
    assert '<span class="k">class</span>' in out and '<span class="diff-sign">+</span>' in out
    bodies = re.findall(r'<span class="diff-lines">(.*?)</span></code></pre>', out, re.S)
    shown = sorted(_text(body) for body in bodies)
    assert shown == sorted("\n".join(d.lines) + "\n" for d in diffs)
    source = (REPO_ROOT / new / "core/block_pool.py").read_text().splitlines()
    special = [line for line in source if set(line) & set("<>&")]
    assert special and not [line for line in special if line in out]  # all escaped
    assert all("+" + line in _text(out) for line in special)
    cli = _run(str(STAGE_DIFF), "--html", old, new)
    assert cli.returncode == 0 and cli.stdout == out, cli.stderr


def test_stage_diff_html_escapes_and_falls_back_to_text(tmp_path):
    stage_diff = _load_tool("stage_diff")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "NOTES").write_text("x < y\n")
    (tmp_path / "b" / "NOTES").write_text("x < y & \"z\"\n")
    (tmp_path / "b" / "m.py").write_text('s = """<b>\n&amp;"""\n')
    diffs = stage_diff.stage_diff("a", "b", root=tmp_path)
    lesson = stage_diff.parse_lesson("# t\n## the idea\nm.py  # uses `<b>` & co\n")
    out = stage_diff.format_html("a", "b", diffs, lesson, root=tmp_path)
    assert out.index('id="diff-m-py" class="stage-diff stage-diff-idea"') < out.index(
        'id="diff-NOTES" class="stage-diff"')
    assert "uses <code>&lt;b&gt;</code> &amp; co" in out
    # The docstring spans two lines: each line is a string token, closed on its line.
    # (Pygments escapes quotes as &quot; before 2.21, not from 2.21 on: both are HTML)
    assert re.search(r'<span class="s2">(&quot;|"){3}&lt;b&gt;</span>', out)
    assert re.search(r'<span class="s2">&amp;amp;(&quot;|"){3}</span>', out)
    assert 'class="diff-line diff-add" data-n="1"><span class="diff-sign">+</span>x &lt; y' in out
    assert 'class="diff-line diff-del" data-n="1"><span class="diff-sign">-</span>x &lt; y\n' in out
    assert "<code>a</code> and <code>a</code> are identical" in stage_diff.format_html(
        "a", "a", [], lesson, root=tmp_path)


def test_stage_diff_cli_rejects_a_missing_stage():
    result = _run(str(STAGE_DIFF), "m0_init", "m9_nothing")
    assert result.returncode == 2
    assert "m9_nothing" in result.stderr


def test_search_check_finds_the_token_set_merges_that_break_the_search():
    """tools/search_check.py builds lunr's automaton over the terms as the theme's search
    worker does: a node with digit edges `0`->2 and `1`->2 has lunr's key "00212", and so
    has a different node with the one edge `0`->212: lunr merges them, and the words under
    the second one are lost (node 212 here is the one reached by "y0": 1 is the root, 2
    the shared final leaf, the filler word takes the ids up to it)."""
    search_check = _load_tool("search_check")
    words = {"a", "b" + "c" * 204, "x0", "x1", "y0q", "y0r", "y0s"}
    (merge,) = search_check.token_set_collisions(words)
    assert merge.key == "00212" and merge.prefix == "y"
    assert merge.kept == (False, (("0", 2), ("1", 2))) and merge.dropped == (False, (("0", 212),))
    # The same shape with letters for edges gives unambiguous keys: nothing merged.
    assert search_check.token_set_collisions({w.replace("0", "p").replace("1", "q")
                                              for w in words}) == []
    # The terms are the index's text outside tags, split at its separator, lower-cased,
    # without stop words.
    index = {"config": {"separator": r"[\s\-]+", "pipeline": ["stopWordFilter"]},
             "docs": [{"location": "a/", "title": "The <code>Block</code> pool",
                       "text": "<p>a free-list of blocks<br/>x</p>"}]}
    assert search_check.terms_of(index, {"the", "of", "a"}) == {
        "block", "pool", "free", "list", "blocks", "x"}
    # The site's separator (mkdocs.yml) leaves bare numbers out; words with digits stay.
    config = yaml.load((REPO_ROOT / "mkdocs.yml").read_text(), Loader=_IgnoreTags)
    (search,) = [p["search"] for p in config["plugins"] if isinstance(p, dict) and "search" in p]
    index = {"config": {"separator": search["separator"], "pipeline": []}, "docs": [
        {"location": "b/", "title": "M4 on an H100",
         "text": "<p>qwen2.5-0.5b: 1.157 ms, 1024 tokens (12:30), m4_flash_attn, 0x7f, "
                 "20261126-191458.json x[7]</p>"}]}
    assert search_check.terms_of(index, set()) == {
        "m4", "on", "an", "h100", "qwen2.5", "0.5b:", "ms,", "tokens", "(", "),",
        "m4_flash_attn,", "0x7f,", "191458.json", "x[", "]"}


def _fake_results(folder: Path, workload: str, milestones: list[str], date: str) -> Path:
    summary = {"ttft_mean_ms": 12.5, "ttft_p50_ms": 12.0, "ttft_p99_ms": 15.0,
               "tpot_mean_ms": 3.25, "tpot_p50_ms": 3.0, "tpot_p99_ms": 4.0,
               "e2e_mean_s": 0.5, "e2e_p50_s": 0.5, "e2e_p99_s": 0.6,
               "output_tokens_per_s": 4321.0, "requests_per_s": 2.0, "total_time_s": 1.0,
               "peak_memory_mib": 100.0, "throughput_ratio": 1.0, "roofline_fraction": None,
               "kv_cache": None}
    command = (f"python bench/compare.py --milestones {','.join(milestones)} --workload "
               f"{workload} --model dummy:tiny-llama --device cpu --out-dir /tmp/x "
               "--no-progress")
    results = {"command": command, "git_commit": "abcdef1234" + "0" * 30, "git_dirty": False,
               "workload": workload, "model": "dummy:tiny-llama", "device": "cpu",
               "date": date, "machine": {"gpu": None, "cpu": "test cpu", "cpu_count": 2},
               "versions": {}, "config": {"num_prompts": 2, "seed": 0}, "roofline": None,
               "rows": [{"milestone": m, "note": "", "summary": summary, "samples": []}
                        for m in milestones]}
    stem = f"{workload}-dummy-tiny-llama-cpu-{date[:10].replace('-', '')}-000000"
    (folder / f"{stem}.json").write_text(json.dumps(results))
    (folder / f"{stem}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder / f"{stem}.json"


def test_bench_table_shows_the_pinned_file_with_its_command(tmp_path, monkeypatch):
    hooks = _load_tool("mkdocs_hooks")
    monkeypatch.setenv("FOLOVLLM_RESULTS_DIR", str(tmp_path))
    page = SimpleNamespace(file=SimpleNamespace(src_uri="m1_basic.md"))
    config = SimpleNamespace(docs_dir=str(REPO_ROOT / "docs"))

    def render(text: str) -> str:
        return hooks.on_page_markdown(text, page, config, files=None)

    older = _fake_results(tmp_path, "latency", ["m1", "hf"], "2026-01-01T00:00:00Z")
    newer = _fake_results(tmp_path, "latency", ["m1", "m2", "hf"], "2026-02-01T00:00:00Z")
    table = render(f"<!-- bench-table: file={older.name} -->")
    # the named file, not the newer one of the same workload
    assert older.name in table and newer.name not in table
    assert "| m1 |" in table and "| hf |" in table and "4321" in table
    assert f"](bench-results/{older.stem}.png)" in table
    # where the numbers come from, and the command without the output-folder flags
    assert "measured at commit `abcdef1234`" in table
    assert ("python bench/compare.py --milestones m1,hf --workload latency \\\n"
            "    --model dummy:tiny-llama --device cpu\n") in table
    assert "--out-dir" not in table and "--no-progress" not in table
    # rows=: only those rows, the others named
    picked = render(f"<!-- bench-table: file={newer.name} rows=m2,hf -->")
    assert "| m2 |" in picked and "| m1 |" not in picked and "also has rows m1" in picked
    with pytest.raises(ValueError, match="no row m7"):
        render(f"<!-- bench-table: file={newer.name} rows=m7 -->")
    with pytest.raises(ValueError, match="no results file"):
        render("<!-- bench-table: file=nothing.json -->")
    with pytest.raises(ValueError, match="file= is required"):
        render("<!-- bench-table: rows=m1 -->")
    with pytest.raises(ValueError, match="bad option"):
        render(f"<!-- bench-table: file={older.name} workload=latency -->")
    every = render("<!-- bench-all -->")
    assert every.count("| m1 |") == 2 and every.index(newer.name) < every.index(older.name)


def test_itl_cdf_marker_draws_the_rows_that_have_itl(tmp_path, monkeypatch):
    """An itl-cdf marker shows the CDF that bench_plots draws at build time; a file from
    before the ITL stops the build with its name, and its bench table has no ITL table."""
    pytest.importorskip("matplotlib")
    hooks = _load_tool("mkdocs_hooks")
    monkeypatch.setenv("FOLOVLLM_RESULTS_DIR", str(tmp_path))
    page = SimpleNamespace(file=SimpleNamespace(src_uri="m5_chunked_prefill.md"))
    docs = tmp_path / "docs"
    docs.mkdir()

    def render(text: str) -> str:
        return hooks.on_page_markdown(text, page, SimpleNamespace(docs_dir=str(docs)), None)

    old = _fake_results(tmp_path, "online", ["m4", "m5"], "2026-01-01T00:00:00Z")
    assert "ITL" not in render(f"<!-- bench-table: file={old.name} -->")
    with pytest.raises(ValueError, match=f"{old.name} has no ITL percentiles"):
        render(f"<!-- itl-cdf: file={old.name} -->")
    new = _fake_results(tmp_path, "online", ["m4", "m5", "m5:enable_chunked_prefill=false"],
                        "2026-02-01T00:00:00Z")
    results = json.loads(new.read_text())
    for row in results["rows"]:
        row["summary"] = dict(row["summary"], itl_mean_ms=2.0, itl_p50_ms=1.5, itl_p99_ms=9.0,
                              itl_max_ms=12.0, itl_gaps=99,
                              itl_quantiles_ms=[0.12 * q for q in range(101)])
    new.write_text(json.dumps(results))
    assert "| m5 | 2.00 | 1.50 | 9.00 | 12.0 | 99 |" in render(
        f"<!-- bench-table: file={new.name} -->")
    rows = "m5,m5:enable_chunked_prefill=false"
    shown = render(f"<!-- itl-cdf: file={new.name} rows={rows} -->")
    image = f"{new.stem}-m5-m5-enable_chunked_prefill-false-itl-cdf.png"
    assert f"](bench-results/{image})" in shown
    assert "CDF of m5, m5:enable_chunked_prefill=false" in shown
    (docs / "m5_chunked_prefill.md").write_text(f"<!-- itl-cdf: file={new.name} rows={rows} -->")
    plots = hooks.bench_plots(docs)
    assert plots[image].startswith(b"\x89PNG")
    assert f"{new.stem}.png" in plots and f"{old.stem}-itl-cdf.png" not in plots


def _provenance_fields(command: str) -> dict:
    return {"command": command, "git_commit": "fedcba9876" + "0" * 30, "git_dirty": True,
            "date": "2026-03-04T05:06:07Z",
            "machine": {"gpu": "Test GPU 80GB", "sm_count": 132, "cpu": "test cpu",
                        "cpu_count": 16},
            "versions": {"torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"}}


def _fake_profile(folder: Path) -> Path:
    def row(stage, setting, batch, wall, cpu, gpu, kernels, graphs, **extra):
        return {"row": stage + (f":{setting}" if setting else ""), "stage": stage,
                "setting": setting, "batch": batch, "wall_ms": wall, "cpu_ms": cpu,
                "gpu_ms": gpu, "gpu_busy": gpu / wall, "kernels_per_step": kernels,
                "graph_launches_per_step": graphs,
                "gpu_time_source": "profiler: sum of kernel durations", "top_kernels": [],
                **extra}
    results = _provenance_fields("python3 tools/profile_step.py --m4-eager --out /tmp/p.json")
    results.update(device="cuda", model="dummy:tiny-llama", prompt_len=200, steps=20, rows=[
        row("m3_paged_kv", None, 1, 37.25, 37.0, 3.5, 1351.0, 0.0),
        row("m4_flash_attn", None, 64, 2.75, 1.125, 1.5, 367.0, 1.0,
            gpu_time_source="cuda_events: the step's span"),
        row("m4_flash_attn", "eager", 64, 14.5, 14.25, 1.625, 368.0, 0.0),
        {"row": "m4_flash_attn:graphs", "stage": "m4_flash_attn", "setting": "graphs",
         "batch": 256, "wall_ms": None, "error": "RuntimeError: out of memory"}])
    path = folder / "profile-dummy-tiny-llama-cuda-test.json"
    path.write_text(json.dumps(results))
    return path


def _fake_kernels(folder: Path) -> Path:
    shape = {"model": "qwen-test", "heads": 14, "kv_heads": 2, "head_dim": 64, "block_size": 16}
    results = _provenance_fields("python3 bench/attention_kernels.py --out /tmp/k.json")
    results.update(
        device="cuda", dtype="bfloat16", timings_meaningful=True, block_size=16,
        copy_bandwidth_gbps=2976.9, matmul_tflops=791.6,
        goals={"decode_copy_fraction": {"target": 0.6, "rows": "decode, batch 64",
                                        "min": 0.4415, "met": False},
               "prefill_vs_sdpa": {"target": 0.7, "rows": "every prefill row",
                                   "min": 0.2137, "met": False}},
        rows=[{**shape, "kind": "decode", "batch": 64, "context": 1024, "ok": True,
               "num_splits": 3, "kernel_us": 25.53, "gbps": 1314.5, "copy_fraction": 0.4415,
               "m3_us": 128.04, "m3_ok": True},
              {**shape, "kind": "decode", "batch": 256, "context": 4096, "ok": False,
               "num_splits": 1, "kernel_us": 215.0, "gbps": 2497.0, "copy_fraction": 0.84,
               "m3_us": 1550.1, "m3_ok": True},
              {**shape, "kind": "prefill", "prompts": 4, "prompt_len": 512, "ok": True,
               "kernel_us": 67.88, "tflops": 27.74, "sdpa_us": 19.97, "sdpa_tflops": 94.26,
               "sdpa_ok": True, "ratio_vs_sdpa": 0.2137}])
    path = folder / "kernels-test.json"
    path.write_text(json.dumps(results))
    return path


def _render_in(folder: Path, monkeypatch):
    hooks = _load_tool("mkdocs_hooks")
    monkeypatch.setenv("FOLOVLLM_RESULTS_DIR", str(folder))
    page = SimpleNamespace(file=SimpleNamespace(src_uri="m4_flash_attn.md"))
    return lambda text: hooks.on_page_markdown(text, page, None, files=None)


def test_profile_table_shows_the_pinned_profile_with_its_provenance(tmp_path, monkeypatch):
    render = _render_in(tmp_path, monkeypatch)
    path = _fake_profile(tmp_path)
    out = render(f"<!-- profile-table: file={path.name} -->")
    assert "| stage | batch | wall ms/step | CPU ms | GPU ms | GPU busy | kernels/step |" in out
    # M3 as it is; an M4 row says whether it replayed CUDA graphs (from the launches seen)
    assert "| `m3_paged_kv` | 1 | 37.2 | 37.0 | 3.50 | 9.4% | 1351 |" in out
    assert "| `m4_flash_attn` (CUDA graphs) | 64 | 2.75 | 1.12 | 1.50* | 55% | 367 |" in out
    assert "| `m4_flash_attn` (eager) | 64 | 14.5 | 14.2 | 1.62 | 11% | 368 |" in out
    assert "| `m4_flash_attn` (CUDA graphs) | 256 | failed |" in out
    assert "* GPU ms from CUDA events" in out  # the row whose GPU time is not the kernels'
    # the machine, the date, the commit (dirty) and the command without --out
    assert "Test GPU 80GB (132 SMs; host: 16 CPU cores)" in out and "2026-03-04" in out
    assert "measured at commit `fedcba9876` (with uncommitted changes)" in out
    assert "```bash\npython3 tools/profile_step.py --m4-eager\n```" in out
    with pytest.raises(ValueError, match="no results file nothing.json"):
        render("<!-- profile-table: file=nothing.json -->")
    with pytest.raises(ValueError, match="file= is required"):
        render("<!-- profile-table: -->")
    with pytest.raises(ValueError, match="bad option 'rows=m3'"):
        render(f"<!-- profile-table: file={path.name} rows=m3 -->")
    compare_file = _fake_results(tmp_path, "latency", ["m1"], "2026-01-01T00:00:00Z")
    with pytest.raises(ValueError, match="not a results file of tools/profile_step.py"):
        render(f"<!-- profile-table: file={compare_file.name} -->")


def test_profile_table_tells_the_weights_apart_and_mixed_steps_by_their_own_steps(
        tmp_path, monkeypatch):
    """A file with quantized rows names each row's weights (M7: bf16 and 4-bit GPTQ rows of
    one stage). A file of mixed steps, which get dearer step by step, sets its CPU and GPU
    times against the profiled wall time of the same steps: no GPU busy over 100% and no
    CPU time of zero because the unprofiled steps were cheaper."""
    render = _render_in(tmp_path, monkeypatch)

    def row(setting, batch, **fields):
        return {"row": "m7_gptq" + (f":{setting}" if setting else ""), "stage": "m7_gptq",
                "setting": setting, "batch": batch, "graph_launches_per_step": 1.0,
                "gpu_time_source": "profiler: sum of kernel durations",
                "kernels_per_step": 366.0,
                "config": {"dtype": "auto", "device": "cuda",
                           "quantization": "gptq" if setting else None}, **fields}
    results = _provenance_fields("python3 tools/profile_step.py --stages m7,m7:gptq")
    results.update(device="cuda", model="dummy:tiny-llama", prompt_len=200, steps=20, rows=[
        row(None, 1, wall_ms=2.5, cpu_ms=1.75, gpu_ms=1.25, gpu_busy=0.5),
        row("gptq", 1, wall_ms=1.75, cpu_ms=0.625, gpu_ms=1.25, gpu_busy=0.714)])
    (tmp_path / "profile-m7.json").write_text(json.dumps(results))
    out = render("<!-- profile-table: file=profile-m7.json -->")
    assert "| `m7_gptq` (bf16, CUDA graphs) | 1 | 2.50 | 1.75 | 1.25 | 50% | 366 |" in out
    assert "| `m7_gptq` (4-bit GPTQ, CUDA graphs) | 1 | 1.75 | 0.625 | 1.25 | 71% | 366 |" in out

    mixed = dict(results, rows=[
        row(None, 16, mixed_budget=512, wall_ms=6.75, cpu_ms=0.0, gpu_ms=10.0, gpu_busy=1.48,
            wall_ms_profiled=12.5, cpu_ms_profiled=2.75, blocked_ms=9.75)])
    mixed["rows"][0]["config"]["quantization"] = None
    (tmp_path / "profile-mixed.json").write_text(json.dumps(mixed))
    out = render("<!-- profile-table: file=profile-mixed.json -->")
    assert ("| stage | batch | wall ms/step | profiled wall ms | CPU ms | GPU ms | GPU busy | "
            "kernels/step |") in out
    assert "| `m7_gptq` (CUDA graphs) | 16 | 6.75 | 12.5 | 2.75 | 10.0 | 80% | 366 |" in out
    assert "Each step costs more than the one before it" in out


def test_kernel_table_shows_decode_and_prefill_with_their_goals(tmp_path, monkeypatch):
    render = _render_in(tmp_path, monkeypatch)
    path = _fake_kernels(tmp_path)
    decode = render(f"<!-- kernel-table: file={path.name} part=decode -->")
    assert ("| model | batch | context | splits | µs | GB/s | % of copy | M3 path µs |"
            in decode)
    assert "| qwen-test | 64 | 1024 | 3 | 25.5 | 1314 | 44% | 128.0 |" in decode
    assert "| qwen-test | 256 | 4096 | 1 | WRONG | - | - | 1550.1 |" in decode  # not a number
    assert "copy bandwidth of this GPU (2977 GB/s" in decode
    assert "Goal for decode, batch 64: a share of the copy bandwidth of at least 60%; " \
           "the lowest there is 44%: not met." in decode
    assert "`qwen-test`: 14 query heads, 2 KV heads, head_dim 64" in decode
    assert "prompts × length" not in decode
    assert "```bash\npython3 bench/attention_kernels.py\n```" in decode
    assert "measured at commit `fedcba9876` (with uncommitted changes)" in decode
    prefill = render(f"<!-- kernel-table: file={path.name} part=prefill -->")
    assert "| model | prompts × length | µs | TFLOP/s | SDPA flash TFLOP/s | ratio |" in prefill
    assert "| qwen-test | 4 × 512 | 67.9 | 27.7 | 94.3 | 0.21 |" in prefill
    assert "a ratio of at least 0.70; the lowest there is 0.21: not met." in prefill
    assert "| splits |" not in prefill
    both = render(f"<!-- kernel-table: file={path.name} -->")
    assert "| 25.5 |" in both and "| 0.21 |" in both
    with pytest.raises(ValueError, match="no results file nothing.json"):
        render("<!-- kernel-table: file=nothing.json -->")
    with pytest.raises(ValueError, match="part= is decode or prefill"):
        render(f"<!-- kernel-table: file={path.name} part=both -->")
    with pytest.raises(ValueError, match="bad option"):
        render(f"<!-- kernel-table: file={path.name} model=qwen-test -->")
    with pytest.raises(ValueError, match="not a results file of bench/attention_kernels.py"):
        render(f"<!-- kernel-table: file={_fake_profile(tmp_path).name} -->")


def test_kernel_table_shows_the_share_of_read_bandwidth_when_measured(tmp_path, monkeypatch):
    """A decode kernel only reads: over 100% of the copy bandwidth is possible, and the
    table then says why, beside the share of the read bandwidth."""
    render = _render_in(tmp_path, monkeypatch)
    path = _fake_kernels(tmp_path)
    results = json.loads(path.read_text())
    results["read_bandwidth_gbps"] = 3600.0
    results["rows"][0].update(copy_fraction=1.08, read_fraction=0.89)
    path.write_text(json.dumps(results))
    decode = render(f"<!-- kernel-table: file={path.name} part=decode -->")
    assert "| splits | µs | % of copy | % of read | M3 path µs |" in decode
    assert "| 3 | 25.5 | 108% | 89% | 128.0 |" in decode
    assert "read bandwidth (3600 GB/s" in decode and "can pass 100%" in decode


def _fake_ppl(folder: Path) -> Path:
    results = _provenance_fields("python -m m7_gptq.eval_ppl --model default --model /q/gptq "
                                 "--out /tmp/ppl.json")
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True,
            "sym": True, "damp_percent": 0.01, "checkpoint_format": "gptq", "lm_head": False}
    results.update(text="stdlib:heldout", seq_len=512, results=[
        {"model": "default", "perplexity": 12.3456, "nll": 2.51, "tokens": 32704,
         "windows": 64, "seq_len": 512, "seconds": 80.0, "quantization": None, "device": "cpu"},
        {"model": "/q/gptq", "perplexity": 13.0, "nll": 2.56, "tokens": 32704, "windows": 64,
         "seq_len": 512, "seconds": 90.0, "quantization": gptq, "device": "cpu",
         "checkpoint": {"command": "python -m m7_gptq.quantize --model default --desc-act "
                                   "--no-progress --out /q/gptq",
                        "git_commit": "abcdef0123" + "0" * 30, "git_dirty": False,
                        "method": "gptq", "quantization_config": gptq, "seconds": 297.2,
                        "device": "cpu"}}])
    path = folder / "gptq-ppl-test.json"
    path.write_text(json.dumps(results))
    return path


def _fake_quant_log(folder: Path, method: str, desc_act: bool, scale: float) -> Path:
    config = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": desc_act,
              "sym": True, "damp_percent": 0.01, "checkpoint_format": "gptq", "lm_head": False}
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    log = {**_provenance_fields(f"python -m m7_gptq.quantize --model default --method {method} "
                                "--no-progress --out /tmp/q4"),
           "model": "default", "method": method, "quantization_config": config,
           "num_samples": 128, "seq_len": 512, "calibration": "stdlib:calibration",
           "seconds": 42.0, "device": "cpu",
           "layers": [{"layer": i, "seconds": 1.0,
                       "errors": {n: scale * (i + 1) * (j + 1) for j, n in enumerate(names)}}
                      for i in range(3)]}
    path = folder / f"quantize-log-{method}{'-act' if desc_act else ''}.json"
    path.write_text(json.dumps(log))
    return path


def _fake_gptq_kernels(folder: Path) -> Path:
    results = _provenance_fields("python3 tools/bench_gptq_kernels.py --out /tmp/g.json")
    shape = {"kind": "shape", "count": 2, "max_abs_err": 0.001, "tolerance": 0.01, "plan": {}}
    results.update(stage="m7_gptq", bits=4, group_size=64, dtype="bfloat16", rows=[
        {**shape, "m": 1, "linears": "q_proj, o_proj", "k": 896, "n": 896, "torch_us": 8.25,
         "gptq_us": 4.5, "torch_gbps": 194.6, "gptq_gbps": 101.3, "ratio": 1.8333, "ok": True},
        {**shape, "m": 1, "linears": "down_proj", "k": 4864, "n": 896, "count": 1,
         "torch_us": 12.0, "gptq_us": 50.0, "torch_gbps": 726.0, "gptq_gbps": 46.0,
         "ratio": 0.24, "ok": False},
        {"kind": "layer", "m": 1, "linears": 3, "torch_us": 28.5, "gptq_us": 59.0,
         "ratio": 0.483, "ok": False},
        {"kind": "sweep", "m": 1, "linears": "down_proj", "k": 4864, "n": 896, "count": 1,
         "config": {"fill": 0}, "label": "fill=0", "us": 3.0, "plan": {}, "error": None}])
    path = folder / "gptq-kernels-test.json"
    path.write_text(json.dumps(results))
    return path


def test_ppl_table_shows_each_model_against_the_first(tmp_path, monkeypatch):
    render = _render_in(tmp_path, monkeypatch)
    path = _fake_ppl(tmp_path)
    out = render(f"<!-- ppl-table: file={path.name} -->")
    assert "| model | method | quantization | perplexity | vs first | tokens |" in out
    assert "| `default` | - | none | 12.346 | +0.000 | 32704 |" in out
    assert "| `/q/gptq` | gptq | 4-bit, groups of 64, act-order | 13.000 | +0.654 | 32704 |" in out
    assert "held-out half of the standard library" in out and "windows of 512 tokens" in out
    # the checkpoint: its commit (clean) and the command that made it, --out kept
    assert "**GPTQ + act-order** (`/q/gptq`): made at commit `abcdef0123`, 297 s on cpu." in out
    assert ("```bash\npython -m m7_gptq.quantize --model default --desc-act --out /q/gptq\n"
            "```") in out
    # the perplexity run: its commit (dirty) and command, without its --out
    assert "measured at commit `fedcba9876` (with uncommitted changes)" in out
    assert "```bash\npython -m m7_gptq.eval_ppl --model default --model /q/gptq\n```" in out
    assert "/tmp/ppl.json" not in out
    results = json.loads(path.read_text())
    for key in ("command", "git_commit"):  # a checkpoint that does not say how it was made
        lost = json.loads(json.dumps(results))
        del lost["results"][1]["checkpoint"][key]
        path.write_text(json.dumps(lost))
        with pytest.raises(ValueError, match="does not record the command and git commit"):
            render(f"<!-- ppl-table: file={path.name} -->")
    path.write_text(json.dumps(results))
    with pytest.raises(ValueError, match="no results file nothing.json"):
        render("<!-- ppl-table: file=nothing.json -->")
    with pytest.raises(ValueError, match="not a results file of python -m m7_gptq.eval_ppl"):
        render(f"<!-- ppl-table: file={_fake_kernels(tmp_path).name} -->")
    with pytest.raises(ValueError, match="bad option"):
        render(f"<!-- ppl-table: file={path.name} rows=m7 -->")


def test_quant_error_marker_draws_one_line_per_log(tmp_path, monkeypatch):
    """A quant-error marker shows the plot that quant_error_plots draws at build time and
    a table of the mean error per kind of linear, one column per log; a file that is not
    a quantize log, or a missing one, stops the build with its name."""
    pytest.importorskip("matplotlib")
    hooks = _load_tool("mkdocs_hooks")
    monkeypatch.setenv("FOLOVLLM_RESULTS_DIR", str(tmp_path))
    page = SimpleNamespace(file=SimpleNamespace(src_uri="m7_gptq.md"))
    render = lambda text: hooks.on_page_markdown(text, page, None, files=None)  # noqa: E731
    rtn = _fake_quant_log(tmp_path, "rtn", False, 1e-3)
    gptq = _fake_quant_log(tmp_path, "gptq", True, 1e-4)
    marker = f"<!-- quant-error: files={rtn.name},{gptq.name} -->"
    out = render(marker)
    image = hooks._quant_error_name([rtn.name, gptq.name])
    assert f"](bench-results/{image})" in out
    assert "| linear | RTN | GPTQ + act-order |" in out
    # q_proj: (1 + 2 + 3) / 3 * 1 * scale; down_proj: the same times 7
    assert "| `q_proj` | 2.00e-03 | 2.00e-04 |" in out
    assert "| `down_proj` | 1.40e-02 | 1.40e-03 |" in out
    assert "| all linears | 8.00e-03 | 8.00e-04 |" in out
    assert "4-bit, groups of 64" in out and "128 sequences of 512 tokens" in out
    # each log's commit and command, --out kept (it names the checkpoint)
    assert (f"**RTN**, from `{rtn.name}`: made at commit `fedcba9876` (with uncommitted "
            "changes), 42 s on cpu.") in out
    assert ("```bash\npython -m m7_gptq.quantize --model default --method rtn --out /tmp/q4\n"
            "```") in out
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "m7_gptq.md").write_text(marker)
    assert hooks.quant_error_plots(docs)[image].startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="no results file nothing.json"):
        render(f"<!-- quant-error: files={rtn.name},nothing.json -->")
    with pytest.raises(ValueError, match="not a quantize log"):
        render(f"<!-- quant-error: files={_fake_ppl(tmp_path).name} -->")
    with pytest.raises(ValueError, match="use files="):
        render(f"<!-- quant-error: file={rtn.name} -->")
    log = json.loads(rtn.read_text())
    for key in ("command", "git_commit"):  # a log that does not say how it was made
        rtn.write_text(json.dumps({k: v for k, v in log.items() if k != key}))
        with pytest.raises(ValueError, match="does not record the command and git commit"):
            render(marker)


def test_gptq_kernel_table_shows_shapes_and_layer_sums(tmp_path, monkeypatch):
    render = _render_in(tmp_path, monkeypatch)
    path = _fake_gptq_kernels(tmp_path)
    out = render(f"<!-- gptq-kernel-table: file={path.name} -->")
    assert ("| M | linears | K × N | bf16 µs | 4-bit µs | bf16 GB/s | 4-bit GB/s | speed-up |"
            in out)
    assert "| 1 | q_proj, o_proj | 896 × 896 | 8.2 | 4.5 | 195 | 101 | 1.83× |" in out
    assert "| 1 | down_proj | 4864 × 896 | 12.0 | WRONG | 726 | - | - |" in out  # no number
    assert "| 1 | **layer** (3 linears) |  | 28.5 | WRONG |  |  | - |" in out
    assert "fill=0" not in out  # the sweep rows are for tuning, not for the page
    assert "Test GPU 80GB (132 SMs; host: 16 CPU cores)" in out and "4 bits" in out
    assert "```bash\npython3 tools/bench_gptq_kernels.py\n```" in out
    with pytest.raises(ValueError, match="no results file nothing.json"):
        render("<!-- gptq-kernel-table: file=nothing.json -->")
    with pytest.raises(ValueError, match="not a results file of tools/bench_gptq_kernels.py"):
        render(f"<!-- gptq-kernel-table: file={_fake_quant_log(tmp_path, 'rtn', False, 1).name} -->")
    with pytest.raises(ValueError, match="has no shape rows"):
        render(f"<!-- gptq-kernel-table: file={_fake_kernels(tmp_path).name} -->")


def _fake_gptq_batch(folder: Path) -> Path:
    """A two-model kernels file: llama-3.1-8b's layer sums at M = 1 .. 256 (4-bit 3x faster
    at one row, slower at 256) with the card's roofline, and one qwen row."""
    results = _provenance_fields("python3 tools/bench_gptq_kernels.py --shapes "
                                 "llama-3.1-8b --rows 1,2,4,8,16,32,64,128,256")
    linears = [{"linears": "qkv_proj", "k": 4096, "n": 6144, "count": 1},
               {"linears": "down_proj", "k": 14336, "n": 4096, "count": 1}]
    ms = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    rows = [{"kind": "layer", "model": "llama-3.1-8b", "m": m, "linears": 2,
             "torch_us": 70.0 + 0.2 * m, "gptq_us": 23.0 + 0.5 * m, "ratio": None,
             "ok": True} for m in ms]
    rows.append({"kind": "layer", "model": "qwen2.5-0.5b", "m": 1, "linears": 7,
                 "torch_us": 40.0, "gptq_us": 30.0, "ratio": 1.33, "ok": True})
    results.update(stage="m7_gptq", bits=4, group_size=64, dtype="bfloat16", rows=rows,
                   roofline={"bandwidth_gbps": 3000.0, "matmul_tflops": 700.0},
                   shape_sets={"llama-3.1-8b": {"decoder_layers": 32, "linears": linears}})
    path = folder / "gptq-batch-test.json"
    path.write_text(json.dumps(results))
    return path


def test_gptq_batch_figure_draws_both_formats_against_m(tmp_path, monkeypatch):
    """A gptq-batch-figure marker shows the picture gptq_batch_plots draws at build time
    (bf16 and 4-bit against M, with the roofline the file measured) and says what the
    regions mean; a file of several models needs model= in the kernel table too."""
    pytest.importorskip("matplotlib")
    render = _render_in(tmp_path, monkeypatch)
    hooks = _load_tool("mkdocs_hooks")
    path = _fake_gptq_batch(tmp_path)
    marker = f"<!-- gptq-batch-figure: file={path.name} model=llama-3.1-8b -->"
    out = render(marker)
    image = hooks._gptq_batch_name(path.name, "llama-3.1-8b")
    assert f"](bench-results/{image})" in out
    assert "2 linears of `llama-3.1-8b`" in out and "roofline of the card" in out
    assert "Test GPU 80GB" in out and "--rows 1,2,4,8,16,32,64,128,256" in out
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "m7_gptq.md").write_text(marker)
    assert hooks.gptq_batch_plots(docs)[image].startswith(b"\x89PNG")
    # the ridges: where the matmul time equals the time to read the weight (bytes/BW)
    weights = 4096 * 6144 + 14336 * 4096
    ridge = hooks._ridge(2 * weights, weights, {"bandwidth_gbps": 3000.0,
                                                "matmul_tflops": 700.0})
    assert ridge == pytest.approx(700e12 / 3000e9)
    with pytest.raises(ValueError, match="model= is required"):
        render(f"<!-- gptq-batch-figure: file={path.name} -->")
    with pytest.raises(ValueError, match="no layer rows of model llama-9b"):
        render(f"<!-- gptq-batch-figure: file={path.name} model=llama-9b -->")
    with pytest.raises(ValueError, match="say which with model="):
        render(f"<!-- gptq-kernel-table: file={path.name} -->")
    no_roofline = json.loads(path.read_text())
    del no_roofline["roofline"]
    path.write_text(json.dumps(no_roofline))
    assert "has no roofline of its card" in render(marker)
    assert hooks.gptq_batch_plots(docs)[image].startswith(b"\x89PNG")


def test_stage_tests_marker_lists_test_files_with_what_they_check():
    hooks = _load_tool("mkdocs_hooks")
    page = SimpleNamespace(file=SimpleNamespace(src_uri="m3_paged_kv.md"))
    out = hooks.on_page_markdown("<!-- stage-tests: tests/test_paged.py -->", page,
                                 SimpleNamespace(docs_dir=str(REPO_ROOT / "docs")), None)
    assert "- `tests/test_paged.py`: The paged KV cache" in out
    assert "python -m pytest -q tests/test_paged.py" in out
    with pytest.raises(ValueError, match="no test file"):
        hooks.on_page_markdown("<!-- stage-tests: tests/test_nothing.py -->", page, None, None)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The docs site, built once for the tests below, with --strict."""
    folder = tmp_path_factory.mktemp("docs") / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = _run("-m", "mkdocs", "build", "--strict", "--site-dir", str(folder), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return folder


def test_site_shows_generated_diffs(site):
    m1_page = _page_text(site / "m1_basic" / "index.html")
    # Lines of the M1 engine's source appear in the page, as added lines of the diff.
    engine_src = (REPO_ROOT / "m1_basic/engine/llm_engine.py").read_text().splitlines()
    for line in (engine_src[0], "class LLMEngine:", engine_src[-1]):
        assert "+" + line in m1_page, line
    assert "+++ m1_basic/worker/model_runner.py" in m1_page
    # Every later stage's page shows its own diff from the stage before it.
    for page in sorted((REPO_ROOT / "docs").glob("m[1-9]_*.md")):
        built = _page_text(site / page.stem / "index.html")
        assert f"+++ {page.stem}/" in built, page.name
        built_html = (site / page.stem / "index.html").read_text()
        assert 'class="stage-diff stage-diff-idea">' in built_html
    # M0 has no earlier stage: its page shows its file tree instead.
    m0_page = _page_text(site / "m0_init" / "index.html")
    assert "model_executor/" in m0_page and "+++ " not in m0_page
    # The stage map links the stage pages; the notebooks are rendered into the site.
    index = (site / "index.html").read_text()
    assert 'href="m1_basic/"' in index
    for nb in (REPO_ROOT / "notebooks").glob("*.ipynb"):
        assert (site / "notebooks" / nb.stem / "index.html").is_file(), nb.name
    assert "Benchmarks" in _page_text(site / "benchmarks" / "index.html")


class _IgnoreTags(yaml.SafeLoader):
    """mkdocs.yml's YAML, its !!python/name tags read as plain strings."""


_IgnoreTags.add_multi_constructor("tag:yaml.org,2002:python/",
                                  lambda loader, suffix, node: None)


def _search_sections(site: Path) -> dict[str, dict]:
    index = json.loads((site / "search" / "search_index.json").read_text(encoding="utf-8"))
    return {doc["location"]: doc for doc in index["docs"]}


def test_site_search_index_keeps_the_search_working(site):
    """The theme's search (lunr, in the browser) answers from the built index: no terms
    that make lunr merge different parts of its automaton (tools/search_check.py: with
    them, "block" and "prefix cache" found nothing), and the generated diffs' code kept
    out of the index while their summary lines, which say what changed and why, stay in."""
    search_check = _load_tool("search_check")
    merges = search_check.check_index(site / "search" / "search_index.json")
    assert not merges, search_check.describe(merges)
    # no bare numbers among the terms (mkdocs.yml's separator): they made such merges
    # likely after almost any edit
    index = json.loads((site / "search" / "search_index.json").read_text(encoding="utf-8"))
    terms = search_check.terms_of(index, search_check.theme_stop_words())
    assert {"block", "preemption", "gptq", "m4_flash_attn", "h100"} <= terms
    assert not [t for t in terms if re.fullmatch(r"[0-9][0-9.,:]*", t)]
    sections = _search_sections(site)
    diff = sections["m3_paged_kv/#the-diff-from-m2"]
    assert "block_pool.py" in diff["text"] and "python tools/stage_diff.py" in diff["text"]
    assert "class BlockPool" not in diff["text"]  # the code of the diff is not indexed
    assert not any("+class " in doc["text"] for doc in sections.values())


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run the theme's "
                    "search worker (the check above runs without it)")
def test_site_search_finds_common_words(site):
    """The theme's own search worker, run in Node.js over the built index, finds results
    for the words a reader looks for."""
    search_check = _load_tool("search_check")
    queries = ["prefix cache", "block", "preemption", "GPTQ"]
    counts = search_check.theme_search(site / "search" / "search_index.json", queries)
    assert all(counts[q] > 0 for q in queries), counts


def _pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("index.html") if "404" not in p.parts)


def test_site_works_offline(site):
    """Diagrams draw from the copy of Mermaid served with the site; no page loads a
    script, stylesheet or image from the network."""
    remote = re.compile(r'<(?:script|img)[^>]*\ssrc="(?:https?:)?//|'
                        r'<link[^>]*rel="stylesheet"[^>]*href="(?:https?:)?//')
    for page in _pages(site):
        text = page.read_text(encoding="utf-8")
        assert not remote.search(text), f"{page.relative_to(site)} loads from the network"
        if 'class="mermaid"' in text:
            scripts = re.findall(r'<script src="([^"]*mermaid[^"]*)"', text)
            assert scripts, f"{page.relative_to(site)} has a diagram and no Mermaid script"
            assert (page.parent / scripts[0]).resolve().is_file(), scripts[0]
    assert 'class="mermaid"' in (site / "m2_batching" / "index.html").read_text()


def test_site_shows_images_that_exist(site):
    """Each stage page that can generate shows its notebook plots and its bench plots;
    each notebook page shows its plots (saved outputs, inline PNGs)."""
    for stage in ("m1_basic", "m2_batching", "m3_paged_kv", "m4_flash_attn"):
        page = site / stage / "index.html"
        sources = re.findall(r'<img[^>]*\ssrc="([^"]+)"', page.read_text(encoding="utf-8"))
        figures = [s for s in sources if "notebook-figures/" in s]
        plots = [s for s in sources if "bench-results/" in s]
        assert figures and plots, f"{stage}: notebook figures {figures}, bench plots {plots}"
        if stage == "m1_basic":  # a table of some rows of a file: its plot has those rows
            assert any(s.endswith("-m1-hf.png") for s in plots), plots
        for src in figures + plots:
            assert (page.parent / src).resolve().is_file(), f"{stage}: {src} is missing"
    for nb in (REPO_ROOT / "notebooks").glob("*.ipynb"):
        text = (site / "notebooks" / nb.stem / "index.html").read_text(encoding="utf-8")
        assert "data:image/png;base64," in text, f"{nb.name}: no plot shown"


def _table_rows(page: Path) -> list[list[str]]:
    """The cells' text of every row of every table of a built page."""
    rows = []
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", page.read_text(encoding="utf-8"), re.S):
        rows.append([_text(c).strip() for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)])
    return rows


def _markers(doc: str, kind: str) -> list[dict[str, str]]:
    """The options of each `kind` marker of a docs page."""
    text = (REPO_ROOT / "docs" / doc).read_text(encoding="utf-8")
    return [dict(word.split("=", 1) for word in args.split())
            for args in re.findall(rf"<!--\s*{kind}:\s*(.*?)\s*-->", text)]


def test_site_shows_profile_and_kernel_numbers_from_their_files(site):
    """The M4 page's profile and kernel tables hold the numbers of the pinned files."""
    from bench.report import fmt_number

    page = site / "m4_flash_attn" / "index.html"
    rows, text = _table_rows(page), _page_text(page)
    profiles = _markers("m4_flash_attn.md", "profile-table")
    kernels = _markers("m4_flash_attn.md", "kernel-table")
    assert profiles and kernels
    for options in profiles:
        results = json.loads((REPO_ROOT / "bench" / "results" / options["file"]).read_text())
        assert options["file"] in text and results["git_commit"][:10] in text
        # a file that compares async scheduling has a back-to-back column after the wall's
        steady = any(want.get("setting") == "async" for want in results["rows"])
        for want in results["rows"]:
            cells = [str(want["batch"]), fmt_number(want["wall_ms"])] + (
                [fmt_number(want["steady_ms"])] if steady else []) + [
                fmt_number(want["cpu_ms"]), f"{want['kernels_per_step']:.0f}"]
            async_row = want.get("setting") == "async"
            assert any(row[1:len(cells)] + row[-1:] == cells and row[0].startswith(
                want["stage"]) and ("async" in row[0]) == async_row
                for row in rows), f"{options['file']}: no row {cells}"
    for options in kernels:
        results = json.loads((REPO_ROOT / "bench" / "results" / options["file"]).read_text())
        assert options["file"] in text and results["git_commit"][:10] in text
        for want in results["rows"]:
            if options.get("part", want["kind"]) != want["kind"] or not want.get("ok"):
                continue
            if want["kind"] == "decode":
                cells = [want["model"], str(want["batch"]), str(want["context"]),
                         str(want["num_splits"]), f"{want['kernel_us']:.1f}"]
            else:
                cells = [want["model"], f"{want['prompts']} × {want['prompt_len']}",
                         f"{want['kernel_us']:.1f}", f"{want['tflops']:.1f}"]
            assert any(row[:len(cells)] == cells for row in rows), (
                f"{options['file']}: no row {cells}")


def test_build_fails_on_a_missing_profile_file(tmp_path):
    """A profile-table marker whose file is not in the results folder stops the build and
    names the file."""
    profile = _markers("m4_flash_attn.md", "profile-table")[0]
    results = tmp_path / "results"
    results.mkdir()
    for path in (REPO_ROOT / "bench" / "results").glob("*.json"):
        if path.name != profile["file"]:
            (results / path.name).write_bytes(path.read_bytes())
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", FOLOVLLM_RESULTS_DIR=str(results))
    built = _run("-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"),
                 env=env)
    assert built.returncode != 0
    assert f"no results file {profile['file']}" in built.stdout + built.stderr


# About this many characters of table text fit side by side in the page's column at
# 1366 px (tools/screenshot_docs.py checks the real pages in Chromium).
TABLE_ROW_CHARS = 100


def _table_min_width_chars(table: str) -> int:
    """The narrowest a table can be drawn, in characters: a cell wraps at spaces, so a
    column is as wide as its longest word; plus the padding between columns."""
    widths: dict[int, int] = {}
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S):
        for i, cell in enumerate(re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)):
            words = html.unescape(re.sub(r"<[^>]+>", "", cell)).split()
            widths[i] = max([widths.get(i, 0)] + [len(w) for w in words])
    return sum(widths.values()) + 3 * len(widths)


def test_bench_tables_fit_the_page(site):
    """The bench, profile and kernel tables and the stage map have few columns and no
    word that forces the table wider than the page (text in a cell wraps, but only at
    spaces)."""
    # The theme gives every cell a minimum width (5rem): eight columns of it would not fit
    # at 1366 px, so the site's stylesheet lifts it.
    css = (site / "assets" / "stylesheets" / "site.css").read_text()
    assert re.search(r"table:not\(\[class\]\) td \{[^}]*min-width: 0;", css)
    checked = 0
    for page in _pages(site):
        text = page.read_text(encoding="utf-8")
        if "<table>" in text:
            assert "assets/stylesheets/site.css" in text, page
        for table in re.findall(r"<table>(.*?)</table>", text, re.S):
            header = re.findall(r"<th[^>]*>(.*?)</th>", table, re.S)
            if not header or not any(word in header[0] for word in ("milestone", "stage",
                                                                    "model")):
                continue  # the diff's file tables wrap freely
            checked += 1
            assert len(header) <= 8, f"{page.relative_to(site)}: {len(header)} columns"
            width = _table_min_width_chars(table)
            assert width <= TABLE_ROW_CHARS, (
                f"{page.relative_to(site)}: a table {width} characters wide: {header}")
    assert checked >= 4


def test_notebooks_are_committed_with_fresh_outputs():
    """Notebooks go in with the outputs the docs show, saved by tools/run_notebooks.py
    after the last edit of any cell (the hash of the cells matches), with no errors,
    and every cell tagged figure:NAME holds its plot."""
    import nbformat

    run_notebooks = _load_tool("run_notebooks")
    notebooks = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
    assert {nb.stem for nb in notebooks} >= {"m0_init", "m1_basic"}
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        saved = nb.metadata.get("folovllm", {})
        assert saved.get("source_sha256") == run_notebooks.source_sha256(nb), (
            f"{path.name}: cells changed since the outputs were saved; run "
            f"python tools/run_notebooks.py {path.relative_to(REPO_ROOT)}")
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
        for cell in code:
            assert not [o for o in cell.outputs if o.output_type == "error"], path.name
            if any(t.startswith("figure:") for t in cell.metadata.get("tags", [])):
                assert any("image/png" in o.get("data", {}) for o in cell.outputs), (
                    f"{path.name}: cell tagged {cell.metadata['tags']} drew no plot")
