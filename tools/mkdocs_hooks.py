"""MkDocs hooks: fill the docs pages from the code and the bench results at build time.

Docs tooling, introduced with M1. Registered in `mkdocs.yml` under `hooks:`. A page
holds markers (HTML comments) that this hook replaces before the Markdown is rendered:

- `<!-- stage-diff: m0_init m1_basic -->`: the diff between two stages, one collapsible
  block per changed file (from `tools/stage_diff.py`).
- `<!-- stage-tree: m0_init -->`: a stage's file tree with line counts.
- `<!-- stage-map -->`: the table of all stages (`bench/stages.py`), linking the ones
  that have a page.
- `<!-- bench-table: workload=latency milestones=m1 [device=cpu] [model=NAME] -->`: the
  table of the newest results file for that workload that has those milestones (through
  `bench/report.py`), with its plot when one exists.
- `<!-- bench-all -->`: every results file, newest first, each with table and plot.

It also adds files that live outside `docs/` to the site without copying or linking
them into `docs/`: the notebooks (`notebooks/*.ipynb`, rendered by mkdocs-jupyter) and
the bench plots (`bench/results/*.png`, served under `bench-results/`). Set
`FOLOVLLM_RESULTS_DIR` to read results from another folder (e.g. `bench/scratch`).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO_ROOT))
import stage_diff  # noqa: E402  (tools/stage_diff.py, next to this file)
from bench.stages import ALL_STAGES  # noqa: E402  (the one list of stages)

PLOTS_URI = "bench-results"  # where the bench plots appear in the site

_MARKER = re.compile(r"<!--\s*(stage-diff|stage-tree|stage-map|bench-table|bench-all)"
                     r"\s*:?\s*(.*?)\s*-->")


# -- files from outside docs/ ---------------------------------------------------------
@event_priority(50)  # before mkdocs-jupyter wraps the notebooks
def on_files(files, config):
    for nb in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        # A real file whose source folder is the repository root (mkdocs-jupyter's
        # wrapper reads `src_dir`, so a "generated" file would lose its path).
        files.append(File(f"notebooks/{nb.name}", src_dir=str(REPO_ROOT),
                          dest_dir=config.site_dir,
                          use_directory_urls=config.use_directory_urls))
    for png in sorted(results_dir().glob("*.png")):
        files.append(File.generated(config, f"{PLOTS_URI}/{png.name}", abs_src_path=str(png)))
    return files


# -- markers --------------------------------------------------------------------------
def on_page_markdown(markdown, page, config, files):
    def replace(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2)
        where = f"{page.file.src_uri}: <!-- {kind} {args} -->"
        try:
            if kind == "stage-diff":
                old, new = _words(args, 2, where)
                return stage_diff.format_markdown(old, new, stage_diff.stage_diff(old, new))
            if kind == "stage-tree":
                (stage,) = _words(args, 1, where)
                return f"```text\n{stage_diff.format_tree(stage)}```\n"
            if kind == "stage-map":
                return _stage_map(config)
            if kind == "bench-table":
                return _bench_table(_options(args, where), page)
            return _bench_all(page)
        except FileNotFoundError as exc:
            raise ValueError(f"{where}: {exc}") from exc

    return _MARKER.sub(replace, markdown)


def _words(args: str, n: int, where: str) -> list[str]:
    words = args.split()
    if len(words) != n:
        raise ValueError(f"{where}: expected {n} stage name(s)")
    return words


def _options(args: str, where: str) -> dict[str, str]:
    options = {}
    for word in args.split():
        key, sep, value = word.partition("=")
        if not sep or key not in ("workload", "milestones", "device", "model"):
            raise ValueError(f"{where}: bad option {word!r} "
                             "(use workload=, milestones=, device=, model=)")
        options[key] = value
    if "workload" not in options:
        raise ValueError(f"{where}: workload= is required")
    return options


def _stage_map(config) -> str:
    docs = Path(config.docs_dir)
    rows = ["| stage | package | adds | notebook |", "|---|---|---|---|"]
    for s in ALL_STAGES:
        if (docs / f"{s.package}.md").is_file():
            name = f"[`{s.package}`]({s.package}.md)"
        else:
            name = f"`{s.package}`" + ("" if s.present else " (planned)")
        nb = REPO_ROOT / "notebooks" / f"{s.package}.ipynb"
        notebook = f"[{nb.name}](notebooks/{nb.name})" if nb.is_file() else ""
        rows.append(f"| {s.label} | {name} | {s.adds} | {notebook} |")
    return "\n".join(rows) + "\n"


# -- bench results --------------------------------------------------------------------
def results_dir() -> Path:
    return Path(os.environ.get("FOLOVLLM_RESULTS_DIR") or REPO_ROOT / "bench" / "results")


def _report():
    """bench/report.py, or None while it does not exist yet."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        return importlib.import_module("bench.report")
    except ModuleNotFoundError as exc:
        if exc.name in ("bench", "bench.report"):
            return None
        raise


def _plot_links(result_path: Path, page) -> str:
    """Markdown images for the plots written next to a results file."""
    stem = result_path.stem
    pngs = sorted(results_dir().glob(f"{stem}*.png"))
    depth = page.file.src_uri.count("/")
    prefix = "../" * depth
    return "".join(f"\n![{p.stem}]({prefix}{PLOTS_URI}/{p.name})\n" for p in pngs)


def _shown_path(path: Path) -> str:
    path = path.resolve()
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else path.name


def _matches(results: dict, options: dict[str, str], milestones: list[str]) -> bool:
    have = {row.get("milestone") for row in results.get("rows", [])}
    if not set(milestones) <= have:
        return False
    if "device" in options and results.get("device") != options["device"]:
        return False
    return "model" not in options or results.get("model") == options["model"]


def _bench_table(options: dict[str, str], page) -> str:
    workload = options["workload"]
    milestones = [m for m in options.get("milestones", "").split(",") if m]
    empty = f"*No results file yet for this workload (`{workload}`"
    empty += f", milestones {', '.join(milestones)})*\n" if milestones else ")*\n"
    report = _report()
    if report is None:
        return empty
    for path in report.latest_results(workload=workload, milestones=milestones or None,
                                      results_dir=results_dir()):
        path = Path(path)
        results = report.load_results(path)
        if _matches(results, options, milestones):
            return (f"{report.markdown_table(results)}\n"
                    f"<small>From `{_shown_path(path)}`.</small>\n{_plot_links(path, page)}")
    return empty


def _bench_all(page) -> str:
    report = _report()
    paths = ([Path(p) for p in report.latest_results(results_dir=results_dir())]
             if report is not None else [])
    if not paths:
        return "*No results files yet: run `python bench/compare.py` and commit its output.*\n"
    out = []
    for path in paths:
        results = report.load_results(path)
        out.append(f"## {results.get('workload')} · {results.get('model')} · "
                   f"{results.get('device')} · {(results.get('date') or '')[:10]}\n")
        out.append(report.markdown_table(results))
        out.append(f"<small>From `{_shown_path(path)}`.</small>\n{_plot_links(path, page)}")
    return "\n".join(out)
