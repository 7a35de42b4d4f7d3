"""MkDocs hooks: fill the docs pages from the code, the notebooks and the bench results.

Docs tooling, introduced with M1. Registered in `mkdocs.yml` under `hooks:`. A page
holds markers (HTML comments) that this hook replaces when the site is built:

- `<!-- stage-diff: m0_init m1_basic -->`: the diff between two stages as highlighted
  HTML: a table of the changed files (why each changed, from the later stage's LESSON),
  then one collapsible block per file, the files that carry the idea first and open
  (`tools/stage_diff.py`).
- `<!-- stage-tree: m0_init -->`: a stage's file tree with line counts.
- `<!-- stage-map -->`: the table of all stages (`bench/stages.py`), linking the ones
  that have a page.
- `<!-- stage-tests: tests/test_paged.py ... -->`: the test files that check a stage's
  idea, each with the first paragraph of its docstring, and the command that runs them.
- `<!-- bench-table: file=NAME.json [rows=m1,hf] -->`: the table of one committed
  results file of `bench/results/` (through `bench/report.py`), only the named rows if
  `rows=` is given (the ratio column then against the first of them), with the commit
  and command that produced it, and its plot. Pinned by name, so a new run never
  silently replaces it.
- `<!-- bench-all -->`: every committed results file, newest first.
- `<!-- notebook-figure: m2_batching timeline Caption text -->`: the plot that the cell
  tagged `figure:timeline` of `notebooks/m2_batching.ipynb` drew, from the outputs
  committed in the notebook (`tools/run_notebooks.py` saves them).

It also adds files that live outside `docs/` to the site without copying them into
`docs/`: the notebooks (`notebooks/*.ipynb`, rendered with their outputs by
mkdocs-jupyter), the bench plots (drawn from the results files at build time, only the
rows a table shows, under `bench-results/`) and the tagged notebook plots (under
`notebook-figures/`). Set `FOLOVLLM_RESULTS_DIR`
to read results from another folder (e.g. `bench/scratch`, to preview a local run).
"""

from __future__ import annotations

import ast
import base64
import copy
import html
import importlib
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO_ROOT))
import stage_diff  # noqa: E402  (tools/stage_diff.py, next to this file)
from bench.stages import ALL_STAGES  # noqa: E402  (the one list of stages)

PLOTS_URI = "bench-results"  # where the bench plots appear in the site
FIGURES_URI = "notebook-figures"  # where the tagged notebook plots appear
FIGURE_TAG = "figure:"  # a notebook cell tagged figure:NAME is a figure of the site

_MARKER = re.compile(r"<!--\s*(stage-diff|stage-tree|stage-map|stage-tests|bench-table|"
                     r"bench-all|notebook-figure)\s*:?\s*(.*?)\s*-->")
_HTML_SLOT = "FOLOVLLM-HTML-{}"  # a paragraph the rendered HTML replaces (on_page_content)


# -- files from outside docs/ ---------------------------------------------------------
@event_priority(50)  # before mkdocs-jupyter wraps the notebooks
def on_files(files, config):
    for nb in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        # A real file whose source folder is the repository root (mkdocs-jupyter's
        # wrapper reads `src_dir`, so a "generated" file would lose its path).
        files.append(File(f"notebooks/{nb.name}", src_dir=str(REPO_ROOT),
                          dest_dir=config.site_dir,
                          use_directory_urls=config.use_directory_urls))
    for name, data in sorted(bench_plots(Path(config.docs_dir)).items()):
        files.append(File.generated(config, f"{PLOTS_URI}/{name}", content=data))
    for (stem, name), data in sorted(notebook_figures().items()):
        files.append(File.generated(config, f"{FIGURES_URI}/{stem}-{name}.png", content=data))
    return files


# -- markers --------------------------------------------------------------------------
_rendered_html: dict[str, list[str]] = {}  # page src_uri -> HTML for its slots


def on_page_markdown(markdown, page, config, files):
    slots = _rendered_html.setdefault(page.file.src_uri, [])
    slots.clear()

    def replace(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2)
        where = f"{page.file.src_uri}: <!-- {kind} {args} -->"
        try:
            if kind == "stage-diff":
                old, new = _words(args, 2, where)
                diffs = stage_diff.stage_diff(old, new)
                slots.append(stage_diff.format_html(old, new, diffs, stage_diff.read_lesson(new)))
                return f"\n{_HTML_SLOT.format(len(slots) - 1)}\n"
            if kind == "stage-tree":
                (stage,) = _words(args, 1, where)
                return f"```text\n{stage_diff.format_tree(stage)}```\n"
            if kind == "stage-map":
                return _stage_map(config)
            if kind == "stage-tests":
                return _stage_tests(args.split(), where)
            if kind == "bench-table":
                return _bench_table(_options(args, where), page, where)
            if kind == "notebook-figure":
                return _notebook_figure(args, where)
            return _bench_all(page)
        except FileNotFoundError as exc:
            raise ValueError(f"{where}: {exc}") from exc

    return _MARKER.sub(replace, markdown)


def on_page_content(html_text, page, config, files):
    """Put the HTML that must not go through Markdown (the stage diffs) in its slots; on
    a notebook's page, say where its saved outputs come from."""
    if page.file.src_uri.startswith("notebooks/") and page.file.src_uri.endswith(".ipynb"):
        html_text = _notebook_provenance(REPO_ROOT / page.file.src_uri) + html_text
    for n, fragment in enumerate(_rendered_html.get(page.file.src_uri, [])):
        slot = f"<p>{_HTML_SLOT.format(n)}</p>"
        if slot not in html_text:
            raise ValueError(f"{page.file.src_uri}: lost the place of generated block {n}")
        html_text = html_text.replace(slot, fragment)
    return html_text


def _words(args: str, n: int, where: str) -> list[str]:
    words = args.split()
    if len(words) != n:
        raise ValueError(f"{where}: expected {n} stage name(s)")
    return words


def _options(args: str, where: str) -> dict[str, str]:
    options = {}
    for word in args.split():
        key, sep, value = word.partition("=")
        if not sep or key not in ("file", "rows"):
            raise ValueError(f"{where}: bad option {word!r} (use file=NAME.json, a results "
                             "file committed in bench/results/, and rows=m1,hf to show "
                             "only some of its rows)")
        options[key] = value
    if "file" not in options:
        raise ValueError(f"{where}: file= is required: name the committed results file")
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


def _stage_tests(paths: list[str], where: str) -> str:
    """Each test file with the first paragraph of its docstring, and how to run them."""
    if not paths:
        raise ValueError(f"{where}: name at least one test file")
    lines = []
    for rel in paths:
        path = REPO_ROOT / rel
        if not path.is_file() or not rel.startswith("tests/"):
            raise FileNotFoundError(f"no test file {rel}")
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        summary = " ".join(doc.split("\n\n")[0].split())
        if not summary:
            raise ValueError(f"{where}: {rel} has no docstring to say what it checks")
        lines.append(f"- `{rel}`: {summary}")
    lines += ["", "```bash", f"python -m pytest -q {' '.join(paths)}", "```"]
    return "\n".join(lines) + "\n"


# -- notebook figures -----------------------------------------------------------------
def notebook_figures() -> dict[tuple[str, str], bytes]:
    """(notebook stem, figure name) -> PNG bytes, for every cell tagged figure:NAME that
    has a saved image output."""
    import nbformat

    figures = {}
    for path in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            names = [t[len(FIGURE_TAG):] for t in cell.get("metadata", {}).get("tags", [])
                     if t.startswith(FIGURE_TAG)]
            images = [out["data"]["image/png"] for out in cell.get("outputs", [])
                      if "image/png" in out.get("data", {})]
            for name in names:
                if images:
                    figures[(path.stem, name)] = base64.b64decode(images[0])
    return figures


def _notebook_provenance(path: Path) -> str:
    """A note above a notebook: the machine, commit and date of its saved outputs."""
    import nbformat

    run = nbformat.read(path, as_version=4).metadata.get("folovllm", {}).get("executed")
    if not run:
        return ('<div class="admonition note"><p class="admonition-title">No saved outputs'
                '</p><p>Run the notebook to see them.</p></div>\n')
    dirty = " (with uncommitted changes to the code)" if run.get("code_dirty") else ""
    return ('<div class="admonition info"><p class="admonition-title">Saved outputs</p><p>'
            f"The outputs below come from a run on a CPU "
            f"({html.escape(str(run.get('cpu')))}, {run.get('cpu_count')} cores) on "
            f"{html.escape(str(run.get('date', ''))[:10])}, at commit "
            f"<code>{html.escape(str(run.get('git_commit')))}</code>{dirty}, saved by "
            f"<code>python tools/run_notebooks.py</code>. Run the notebook to see your "
            f"machine's.</p></div>\n")


def _notebook_figure(args: str, where: str) -> str:
    words = args.split(maxsplit=2)
    if len(words) < 3:
        raise ValueError(f"{where}: use <!-- notebook-figure: NOTEBOOK NAME Caption -->")
    stem, name, caption = words
    if not (REPO_ROOT / "notebooks" / f"{stem}.ipynb").is_file():
        raise FileNotFoundError(f"no notebook notebooks/{stem}.ipynb")
    if (stem, name) not in notebook_figures():
        raise ValueError(f"{where}: notebooks/{stem}.ipynb has no saved plot in a cell tagged "
                         f"{FIGURE_TAG}{name} (run python tools/run_notebooks.py)")
    return (f"![{caption}]({FIGURES_URI}/{stem}-{name}.png)\n\n"
            f"<small>{caption} From the notebook "
            f"[{stem}.ipynb](notebooks/{stem}.ipynb), as saved with its outputs.</small>\n")


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


def _plot_name(path: Path, rows: str | None) -> str:
    return f"{path.stem}-{rows.replace(',', '-')}.png" if rows else f"{path.stem}.png"


def _plot_link(path: Path, rows: str | None, page) -> str:
    """A Markdown image of the plot drawn for these rows of a results file."""
    prefix = "../" * page.file.src_uri.count("/")
    name = _plot_name(path, rows)
    return f"\n![{name[:-4]}]({prefix}{PLOTS_URI}/{name})\n"


def bench_plots(docs_dir: Path) -> dict[str, bytes]:
    """File name -> PNG of every plot the pages show, drawn from the results files when
    the site is built (`bench/compare.py`'s plot): one per committed file, and one for
    each `rows=` choice of a bench-table marker, so a plot shows what its table shows."""
    report = _report()
    if report is None:
        return {}
    from bench.compare import plot  # matplotlib, only when the site is built

    wanted = {(Path(p), None) for p in report.latest_results(results_dir=results_dir())}
    for page in docs_dir.rglob("*.md"):
        for match in _MARKER.finditer(page.read_text(encoding="utf-8")):
            if match.group(1) == "bench-table":
                options = _options(match.group(2), f"{page.name}: {match.group(0)}")
                wanted.add((results_dir() / options["file"], options.get("rows")))
    plots = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path, rows in sorted(wanted, key=lambda item: (item[0].name, item[1] or "")):
            if not path.is_file():
                continue  # the marker itself reports the missing file
            shown, _ = _pick_rows(report.load_results(path), rows, path.name)
            png = Path(tmp) / "plot.png"
            if plot(shown, png) is not None:
                plots[_plot_name(path, rows)] = png.read_bytes()
    return plots


def _shown_path(path: Path) -> str:
    path = path.resolve()
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else path.name


_NOT_RESULTS = {"--out-dir": 1, "--no-progress": 0, "--no-plot": 0, "--publish": 0}


def reproduce_command(results: dict) -> str | None:
    """The recorded command without the flags that only say where the files go."""
    command = results.get("command")
    if not command:
        return None
    words, kept = shlex.split(command), []
    skip = 0
    for word in words:
        if skip:
            skip -= 1
            continue
        flag = word.split("=", 1)[0]
        if flag in _NOT_RESULTS:
            skip = _NOT_RESULTS[flag] if "=" not in word else 0
            continue
        kept.append(word)
    return _wrap_command(kept)


def _wrap_command(words: list[str], width: int = 76) -> str:
    """A shell command over several lines (ending in ` \\`), each option with its value."""
    groups: list[str] = []
    for word in words:
        quoted = shlex.quote(word)
        if groups and not word.startswith("--") and groups[-1].startswith("--") \
                and " " not in groups[-1]:
            groups[-1] += " " + quoted  # an option's value stays with it
        else:
            groups.append(quoted)
    lines, line = [], ""
    for group in groups:
        if line and len(line) + 1 + len(group) > width:
            lines.append(line)
            line = "    " + group
        else:
            line = f"{line} {group}" if line else group
    return " \\\n".join(lines + [line])


def provenance(results: dict, path: Path) -> str:
    """Where the numbers come from: the file, the commit, and how to run it again."""
    commit = results.get("git_commit") or "an unrecorded commit"
    commit = commit[:10] if re.fullmatch(r"[0-9a-f]{40}", commit) else commit
    dirty = " (with uncommitted changes)" if results.get("git_dirty") else ""
    out = [f"<small>From `{_shown_path(path)}`, measured at commit `{commit}`{dirty}.</small>"]
    command = reproduce_command(results)
    if command:
        out += ["", "Run it again (on the same kind of machine):", "", "```bash", command, "```"]
    else:
        out += ["", "<small>This file did not record its command line.</small>"]
    return "\n".join(out) + "\n"


def _bench_table(options: dict[str, str], page, where: str) -> str:
    report = _report()
    if report is None:
        raise ValueError(f"{where}: bench/report.py is missing")
    path = results_dir() / options["file"]
    if not path.is_file():
        raise FileNotFoundError(f"no results file {options['file']} in {_shown_path(results_dir())}")
    results = report.load_results(path)
    shown, hidden = _pick_rows(results, options.get("rows"), where)
    left_out = (f"<small>The file also has rows {', '.join(hidden)}: see "
                f"[Benchmarks](benchmarks.md).</small>\n\n" if hidden else "")
    return (f"{report.markdown_table(shown)}\n{left_out}{provenance(results, path)}"
            f"{_plot_link(path, options.get('rows'), page)}")


def _pick_rows(results: dict, rows: str | None, where: str) -> tuple[dict, list[str]]:
    """The results with only the named rows (in the file's order), the ratio column
    taken against the first row shown; and the names of the rows left out."""
    have = [row["milestone"] for row in results["rows"]]
    if rows is None:
        return results, []
    wanted = [name for name in rows.split(",") if name]
    missing = [name for name in wanted if name not in have]
    if missing:
        raise ValueError(f"{where}: the file has no row {', '.join(missing)} "
                         f"(it has {', '.join(have)})")
    picked = [copy.deepcopy(row) for row in results["rows"] if row["milestone"] in wanted]
    first = (picked[0].get("summary") or {}).get("output_tokens_per_s")
    for row in picked:
        summary = row.get("summary") or {}
        rate = summary.get("output_tokens_per_s")
        summary["throughput_ratio"] = rate / first if rate is not None and first else None
    return dict(results, rows=picked), [name for name in have if name not in wanted]


def _bench_all(page) -> str:
    report = _report()
    paths = ([Path(p) for p in report.latest_results(results_dir=results_dir())]
             if report is not None else [])
    if not paths:
        return "*No results files yet: run `python bench/compare.py --publish` and commit its output.*\n"
    out = []
    for path in paths:
        results = report.load_results(path)
        out.append(f"## {results.get('workload')} · {results.get('model')} · "
                   f"{results.get('device')} · {(results.get('date') or '')[:10]}\n")
        out.append(report.markdown_table(results))
        out.append(f"{provenance(results, path)}{_plot_link(path, None, page)}")
    return "\n".join(out)
