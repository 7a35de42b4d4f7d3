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
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

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


def _page_text(path: Path) -> str:
    """The visible text of a built page: tags removed, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8")))


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
    markdown = stage_diff.format_markdown("m0_init", "m1_basic", list(diffs.values()))
    assert "`engine/llm_engine.py` (added" in markdown and "```diff" in markdown


def test_stage_diff_cli_rejects_a_missing_stage():
    result = _run(str(STAGE_DIFF), "m0_init", "m9_nothing")
    assert result.returncode == 2
    assert "m9_nothing" in result.stderr


def _fake_results(folder: Path, workload: str, milestones: list[str], date: str) -> Path:
    summary = {"ttft_mean_ms": 12.5, "ttft_p50_ms": 12.0, "ttft_p99_ms": 15.0,
               "tpot_mean_ms": 3.25, "tpot_p50_ms": 3.0, "tpot_p99_ms": 4.0,
               "e2e_mean_s": 0.5, "e2e_p50_s": 0.5, "e2e_p99_s": 0.6,
               "output_tokens_per_s": 4321.0, "requests_per_s": 2.0, "total_time_s": 1.0,
               "peak_memory_mib": 100.0, "throughput_ratio": 1.0, "roofline_fraction": None,
               "kv_cache": None}
    results = {"workload": workload, "model": "dummy:tiny-llama", "device": "cpu",
               "date": date, "machine": {"gpu": None, "cpu": "test cpu", "cpu_count": 2},
               "versions": {}, "config": {"num_prompts": 2, "seed": 0}, "roofline": None,
               "rows": [{"milestone": m, "note": "", "summary": summary, "samples": []}
                        for m in milestones]}
    stem = f"{workload}-dummy-tiny-llama-cpu-{date[:10].replace('-', '')}-000000"
    (folder / f"{stem}.json").write_text(json.dumps(results))
    (folder / f"{stem}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder / f"{stem}.json"


def test_bench_markers_render_results_files(tmp_path, monkeypatch):
    hooks = _load_tool("mkdocs_hooks")
    monkeypatch.setenv("FOLOVLLM_RESULTS_DIR", str(tmp_path))
    page = SimpleNamespace(file=SimpleNamespace(src_uri="m1_basic.md"))
    config = SimpleNamespace(docs_dir=str(REPO_ROOT / "docs"))

    def render(text: str) -> str:
        return hooks.on_page_markdown(text, page, config, files=None)

    empty = render("<!-- bench-table: workload=latency milestones=m1 -->")
    assert "No results file yet for this workload" in empty
    older = _fake_results(tmp_path, "latency", ["m1", "hf"], "2026-01-01T00:00:00Z")
    newer = _fake_results(tmp_path, "latency", ["m1", "hf"], "2026-02-01T00:00:00Z")
    newest = _fake_results(tmp_path, "throughput", ["m1"], "2026-03-01T00:00:00Z")
    table = render("<!-- bench-table: workload=latency milestones=m1 -->")
    assert "No results file yet" not in table
    assert "| m1 |" in table and "| hf |" in table
    assert "4321" in table  # the number comes from the file
    # the newest file of that workload: not the older one, not the throughput one
    assert newer.name in table and older.name not in table and newest.name not in table
    assert f"](bench-results/{newer.stem}.png)" in table
    assert "No results file yet" in render(
        "<!-- bench-table: workload=latency milestones=m2 -->")
    every = render("<!-- bench-all -->")
    assert every.count("| m1 |") == 3
    assert every.index(newest.name) < every.index(newer.name) < every.index(older.name)
    with pytest.raises(ValueError, match="bad option"):
        render("<!-- bench-table: workload=latency speed=fast -->")


def test_mkdocs_build_strict_shows_generated_diff(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = _run("-m", "mkdocs", "build", "--strict", "--site-dir", str(site), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    m1_page = _page_text(site / "m1_basic" / "index.html")
    # Lines of the M1 engine's source appear in the page, as added lines of the diff.
    engine_src = (REPO_ROOT / "m1_basic/engine/llm_engine.py").read_text().splitlines()
    for line in (engine_src[0], "class LLMEngine:", engine_src[-1]):
        assert "+" + line in m1_page, line
    assert "+++ m1_basic/worker/model_runner.py" in m1_page
    assert 'class="mermaid"' in (site / "m1_basic" / "index.html").read_text()
    # Every later stage's page shows its own diff from the stage before it.
    for page in sorted((REPO_ROOT / "docs").glob("m[1-9]_*.md")):
        built = _page_text(site / page.stem / "index.html")
        assert f"+++ {page.stem}/" in built, page.name
    # M0 has no earlier stage: its page shows its file tree instead.
    m0_page = _page_text(site / "m0_init" / "index.html")
    assert "model_executor/" in m0_page and "+++ " not in m0_page
    # The stage map links the stage pages; the notebooks are rendered into the site.
    index = (site / "index.html").read_text()
    assert 'href="m1_basic/"' in index
    for nb in (REPO_ROOT / "notebooks").glob("*.ipynb"):
        assert (site / "notebooks" / nb.stem / "index.html").is_file(), nb.name
    assert "Benchmarks" in _page_text(site / "benchmarks" / "index.html")


def test_notebooks_are_committed_clean():
    """Notebooks go in without outputs (CI executes them); each is valid nbformat 4."""
    import nbformat

    notebooks = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
    assert {nb.stem for nb in notebooks} >= {"m0_init", "m1_basic"}
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path.name
