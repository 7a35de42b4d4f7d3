"""MkDocs hooks: fill the docs pages from the code, the notebooks and the bench results.

Docs tooling, introduced with M1. Registered in `mkdocs.yml` under `hooks:`. A page
holds markers (HTML comments) that this hook replaces when the site is built:

- `<!-- stage-diff: m0_init m1_basic -->`: the diff between two stages as highlighted
  HTML: one closed block per changed file, its summary line saying why it changed (from
  the later stage's LESSON), the files that carry the idea first (`tools/stage_diff.py`).
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
- `<!-- itl-cdf: file=NAME.json [rows=m4,m5] -->`: the inter-token latency CDF of each
  row of a results file (`bench/report.py`'s `plot_itl_cdf`, drawn at build time from
  the percentiles the file keeps), only the named rows with `rows=`. A file without ITL
  percentiles (older than them) stops the build and says so.
- `<!-- profile-table: file=NAME.json -->`: the per-step profile that
  `tools/profile_step.py` wrote (a file of `bench/results/`): per stage and batch size,
  wall, CPU and GPU ms per decode step, GPU busy %, kernels per step; an M4+ row says
  whether it ran eager or as CUDA graphs. With the machine, the date, the commit and the
  command that produced it.
- `<!-- kernel-table: file=NAME.json [part=decode|prefill] -->`: the attention kernels
  measured by `bench/attention_kernels.py` (a file of `bench/results/`): decode rows (time, KV
  bytes read per second and that as a share of the copy bandwidth, M3's path beside) and
  prefill rows (TFLOP/s beside torch's flash SDPA); both tables without `part=`. With
  the same provenance, and the goals the file records.
- `<!-- step-timeline: file=NAME.json [rows=m4,m5] -->`: the step timeline that
  `tools/trace_steps.py` recorded (a file of `bench/results/`; `file=bench/results/NAME.json`
  works too): per row (stage), which requests ran in each engine step, as decodes, whole
  prompts or prompt chunks, and each step's tokens against the token budget; drawn at
  build time by `trace_steps.plot_timeline`, only the named rows with `rows=`. A missing
  file stops the build and names it.
- `<!-- ppl-table: file=NAME.json -->`: the perplexities that `python -m m7_gptq.eval_ppl
  --out` wrote (a file of `bench/results/`): one row per model, its method and
  quantization, its perplexity and the difference from the first row, and the tokens
  scored; with the text it was scored on, the commit and `python -m m7_gptq.quantize`
  command that made each checkpoint (recorded from its `quantize_log.json`), and the
  file's provenance. A checkpoint without its commit or command stops the build.
- `<!-- quant-error: files=A.json,B.json -->`: the per-layer log (`quantize_log.json`)
  that `python -m m7_gptq.quantize` writes beside each checkpoint, copied as it is into
  `bench/results/`, one file per method: each linear layer's relative output error on
  its calibration inputs, drawn at build time as one line per file over the decoder
  layers (the mean of the layer's seven linears), a table of the mean per kind of
  linear, and each log's commit and command. A file that is not such a log, or one
  without its commit or command, stops the build and names it.
- `<!-- gptq-kernel-table: file=NAME.json [model=NAME] -->`: M7's W4A16 matmul against
  bf16 `torch.matmul`, as `tools/bench_gptq_kernels.py` measured it (a file of
  `bench/results/`): per number of rows M, each linear shape's microseconds, the weight
  bytes read per second and the speed-up, and the sum over a decoder layer's linears;
  with the machine and the file's provenance. A file of several models' shapes needs
  `model=` (one table per model).
- `<!-- gptq-batch-figure: file=NAME.json model=NAME -->`: from the same tool's file, a
  decoder layer's linears against the number of rows M, bf16 and 4-bit, log-log, with
  the card's roofline (its measured copy bandwidth and matmul rate): where each is
  bound by reading its weight and where by computing.
- `<!-- notebook-figure: m2_batching timeline Caption text -->`: the plot that the cell
  tagged `figure:timeline` of `notebooks/m2_batching.ipynb` drew, from the outputs
  committed in the notebook (`tools/run_notebooks.py` saves them).

After the build it checks the search index (`tools/search_check.py`) and stops the
build if the theme's search would fail on it.

It also adds files that live outside `docs/` to the site without copying them into
`docs/`: the notebooks (`notebooks/*.ipynb`, rendered with their outputs by
mkdocs-jupyter), the bench plots (drawn from the results files at build time, only the
rows a table shows, and the ITL CDFs and step timelines the pages ask for, under
`bench-results/`) and the
tagged notebook plots (under `notebook-figures/`) and the quantization-error plots
(under `bench-results/`). Set `FOLOVLLM_RESULTS_DIR` to read
results from another folder (e.g. `bench/scratch`, to preview a local run).
"""

from __future__ import annotations

import ast
import base64
import copy
import html
import importlib
import json
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
import search_check  # noqa: E402  (tools/search_check.py: the search index, checked)
import stage_diff  # noqa: E402  (tools/stage_diff.py, next to this file)
import trace_steps  # noqa: E402  (tools/trace_steps.py: step timelines; matplotlib to draw)
from bench.stages import ALL_STAGES  # noqa: E402  (the one list of stages)

PLOTS_URI = "bench-results"  # where the bench plots appear in the site
FIGURES_URI = "notebook-figures"  # where the tagged notebook plots appear
FIGURE_TAG = "figure:"  # a notebook cell tagged figure:NAME is a figure of the site

_MARKER = re.compile(r"<!--\s*(stage-diff|stage-tree|stage-map|stage-tests|bench-table|"
                     r"bench-all|notebook-figure|profile-table|kernel-table|itl-cdf|memory-table|"
                     r"step-timeline|ppl-table|quant-error|gptq-kernel-table|gptq-batch-figure|"
                     r"exercises)"
                     r"\s*:?\s*(.*?)\s*-->")
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
    for name, data in sorted(step_timelines(Path(config.docs_dir)).items()):
        files.append(File.generated(config, f"{PLOTS_URI}/{name}", content=data))
    for name, data in sorted(quant_error_plots(Path(config.docs_dir)).items()):
        files.append(File.generated(config, f"{PLOTS_URI}/{name}", content=data))
    for name, data in sorted(gptq_batch_plots(Path(config.docs_dir)).items()):
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
            if kind == "itl-cdf":
                return _itl_cdf(_options(args, where), page, where)
            if kind == "notebook-figure":
                return _notebook_figure(args, where)
            if kind == "profile-table":
                return _profile_table(_options(args, where, allowed=("file",)), where)
            if kind == "kernel-table":
                return _kernel_table(_options(args, where, allowed=("file", "part")), where)
            if kind == "step-timeline":
                return _step_timeline(_options(args, where), page, where)
            if kind == "memory-table":
                return _memory_table(_options(args, where, allowed=("file",)), where)
            if kind == "ppl-table":
                return _ppl_table(_options(args, where, allowed=("file",)), where)
            if kind == "quant-error":
                return _quant_error(_files_option(args, where), page, where)
            if kind == "exercises":
                return _exercises(args, where)
            if kind == "gptq-kernel-table":
                return _gptq_kernel_table(_options(args, where, allowed=("file", "model")),
                                          where)
            if kind == "gptq-batch-figure":
                return _gptq_batch_figure(_options(args, where, allowed=("file", "model")),
                                          page, where)
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


@event_priority(-100)  # after the search plugin has written the index
def on_post_build(config):
    """Stop the build if the theme's search would break on this site's search index
    (`tools/search_check.py`: terms that make lunr merge different subtrees)."""
    index = Path(config.site_dir) / "search" / "search_index.json"
    if not index.is_file():
        return
    collisions = search_check.check_index(index)
    if collisions:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{index}: the search would fail for some words: "
                          + search_check.describe(collisions)
                          + "\nKeep generated code and data out of the index "
                          "(data-search-exclude), or bare numbers (the search plugin's "
                          "separator in mkdocs.yml).")


def _exercises(args: str, where: str) -> str:
    """`<!-- exercises: m3 -->`: a stage's exercises, each with why it matters, what to
    write and the commands; `<!-- exercises: all -->`: one table of every exercise."""
    from exercises import catalog  # the repository root is on sys.path (above)

    (name,) = _words(args, 1, where)
    if name == "all":
        rows = ["| exercise | stage | what you build | difficulty |", "|---|---|---|---|"]
        pages = {s.short: s.package for s in ALL_STAGES}
        for ex in catalog.all_exercises():
            page = pages[ex.stage_short]
            rows.append(f"| `{ex.id}` | [{ex.stage_short.upper()}]({page}.md#exercises) "
                        f"| {ex.title} | {ex.difficulty} |")
        return "\n".join(rows) + "\n"
    exercises = catalog.find(name)
    out = [f"`python -m exercises start {name}` copies this stage into the workspace "
           f"(`workspace/`, ignored by git) with the code below taken out; write it back, "
           f"and `python -m exercises check {name}.1` runs that exercise's checks on your "
           f"code (`check {name}`: all of them). `python -m exercises solution {name}.1` "
           f"shows the reference. The [exercises page](exercises.md) lists every stage's.",
           ""]
    for ex in exercises:
        writes = ", ".join(f"`{w}`" for w in ex.writes)
        out += [f"- **{ex.id} · {ex.title}** ({ex.difficulty}). {ex.why} Write {writes}; "
                f"check with `{ex.check_command}`.", ""]
    return "\n".join(out)


def _words(args: str, n: int, where: str) -> list[str]:
    words = args.split()
    if len(words) != n:
        raise ValueError(f"{where}: expected {n} stage name(s)")
    return words


_OPTION_HELP = {"file": "file=NAME.json, a results file committed in bench/results/",
                "rows": "rows=m1,hf to show only some of its rows",
                "part": "part=decode or part=prefill to show one of its tables"}


def _options(args: str, where: str, allowed: tuple[str, ...] = ("file", "rows")
             ) -> dict[str, str]:
    options = {}
    for word in args.split():
        key, sep, value = word.partition("=")
        if not sep or key not in allowed:
            raise ValueError(f"{where}: bad option {word!r} (use "
                             f"{', and '.join(_OPTION_HELP[k] for k in allowed)})")
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


def _plot_name(path: Path, rows: str | None, kind: str = "") -> str:
    """The site's file name of a plot: the results file's stem, the rows shown (a row
    with settings, "m5:enable_chunked_prefill=false", in safe characters) and the kind
    ("-itl-cdf" for the ITL CDF, "" for the bars)."""
    shown = "-" + re.sub(r"[^A-Za-z0-9._-]+", "-", rows.replace(",", "-")) if rows else ""
    return f"{path.stem}{shown}{kind}.png"


def _plot_link(path: Path, rows: str | None, page, kind: str = "") -> str:
    """A Markdown image of the plot drawn for these rows of a results file."""
    prefix = "../" * page.file.src_uri.count("/")
    name = _plot_name(path, rows, kind)
    return f"\n![{name[:-4]}]({prefix}{PLOTS_URI}/{name})\n"


_CDF = "-itl-cdf"  # the plot-name suffix of an ITL CDF


def _pyplot():
    """matplotlib's pyplot drawing to files (imported only when a plot is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def page_markers(docs_dir: Path, *kinds: str):
    """(kind, its arguments, where: the page and the marker, for errors) of every marker
    of these kinds on the docs pages: what the plots drawn at build time are asked for."""
    for page in docs_dir.rglob("*.md"):
        for match in _MARKER.finditer(page.read_text(encoding="utf-8")):
            if match.group(1) in kinds:
                yield match.group(1), match.group(2), f"{page.name}: {match.group(0)}"


def bench_plots(docs_dir: Path) -> dict[str, bytes]:
    """File name -> PNG of every plot the pages show, drawn from the results files when
    the site is built (`bench/compare.py`'s plot): one per committed file, one for each
    `rows=` choice of a bench-table marker, so a plot shows what its table shows, and one
    ITL CDF (`bench/report.py`'s plot_itl_cdf) per itl-cdf marker."""
    report = _report()
    if report is None:
        return {}
    from bench.compare import plot  # matplotlib, only when the site is built

    wanted = {(Path(p), None, "") for p in report.latest_results(results_dir=results_dir())}
    for marker, args, where in page_markers(docs_dir, "bench-table", "itl-cdf"):
        options = _options(args, where)
        kind = _CDF if marker == "itl-cdf" else ""
        wanted.add((results_dir() / options["file"], options.get("rows"), kind))
    plots = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path, rows, kind in sorted(wanted, key=lambda w: (w[0].name, w[1] or "", w[2])):
            if not path.is_file():
                continue  # the marker itself reports the missing file
            shown, _ = _pick_rows(report.load_results(path), rows, path.name)
            if kind and not report.itl_curves(shown):
                continue  # the marker itself reports the file without ITL
            png = Path(tmp) / "plot.png"
            drawn = report.plot_itl_cdf(shown, png) if kind else plot(shown, png)
            if drawn is not None:
                plots[_plot_name(path, rows, kind)] = png.read_bytes()
    return plots


def _shown_path(path: Path) -> str:
    path = path.resolve()
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else path.name


# compare.py's --out-dir, the --out FILE.json of bench/attention_kernels.py, profile_step.py and
# trace_steps.py, and trace_steps.py's --png
_NOT_RESULTS = {"--out-dir": 1, "--out": 1, "--png": 1, "--no-progress": 0, "--no-plot": 0,
                "--publish": 0}


def reproduce_command(results: dict, keep: tuple[str, ...] = ()) -> str | None:
    """The recorded command without the flags that only say where the files go (but those
    in `keep`: the quantizer's --out is the checkpoint a later command reads)."""
    command = results.get("command")
    if not command:
        return None
    words, kept = shlex.split(command), []
    if words and words[0].endswith(".py"):  # a tool recorded without its interpreter
        kept.append("python3")
    skip = 0
    for word in words:
        if skip:
            skip -= 1
            continue
        flag = word.split("=", 1)[0]
        if flag in _NOT_RESULTS and flag not in keep:
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


def _commit_text(results: dict) -> str:
    """"`fedcba9876`", with " (with uncommitted changes)" when the tree was dirty."""
    commit = results.get("git_commit") or "an unrecorded commit"
    commit = commit[:10] if re.fullmatch(r"[0-9a-f]{40}", commit) else commit
    return f"`{commit}`" + (" (with uncommitted changes)" if results.get("git_dirty") else "")


def provenance(results: dict, path: Path) -> str:
    """Where the numbers come from: the file, the commit, and how to run it again."""
    out = [f"<small>From `{_shown_path(path)}`, measured at commit "
           f"{_commit_text(results)}.</small>"]
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


def _itl_cdf(options: dict[str, str], page, where: str) -> str:
    """The ITL CDF of a results file's rows (drawn by bench_plots), with a caption."""
    report = _report()
    if report is None:
        raise ValueError(f"{where}: bench/report.py is missing")
    path = results_dir() / options["file"]
    if not path.is_file():
        raise FileNotFoundError(f"no results file {options['file']} in "
                                f"{_shown_path(results_dir())}")
    shown, _ = _pick_rows(report.load_results(path), options.get("rows"), where)
    curves = report.itl_curves(shown)
    if not curves:
        raise ValueError(f"{where}: {options['file']} has no ITL percentiles "
                         "(itl_quantiles_ms) in the rows asked for: a file written before "
                         "the bench kept them, or rows that did not time each token")
    names = ", ".join(name for name, _, _ in curves)
    return (f"{_plot_link(path, options.get('rows'), page, _CDF)}\n"
            f"<small>Inter-token latency CDF of {names}: the share of the gaps between one "
            f"request's consecutive tokens that are at most x ms, from the percentiles kept "
            f"in `{_shown_path(path)}`.</small>\n")


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


# -- step profiles and kernel benchmarks ----------------------------------------------
def _tool_results(options: dict[str, str], where: str, tool: str, row_key: str
                  ) -> tuple[dict, Path]:
    """A results file of `tool` (its rows all have `row_key`), and its path."""
    if "file" not in options:
        raise ValueError(f"{where}: file= is required: name the committed results file")
    path = results_dir() / options["file"]
    if not path.is_file():
        raise FileNotFoundError(f"no results file {options['file']} in "
                                f"{_shown_path(results_dir())}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{where}: {options['file']} is not JSON: {exc}") from exc
    rows = results.get("rows") if isinstance(results, dict) else None
    if not rows or not all(isinstance(row, dict) and row_key in row for row in rows):
        raise ValueError(f"{where}: {options['file']} is not a results file of {tool} "
                         f"(it needs rows that each have {row_key!r})")
    return results, path


def _machine_text(results: dict) -> str:
    """Where and when, e.g. "NVIDIA H100 80GB HBM3 (132 SMs; host: 16 CPU cores), torch
    2.11.0+cu130, Triton 3.6.0, CUDA 13.0, 2026-11-26"."""
    machine, versions = results.get("machine") or {}, results.get("versions") or {}
    host = f"{machine['cpu_count']} CPU cores" if machine.get("cpu_count") else "CPU"
    if machine.get("gpu"):
        sms = f"{machine['sm_count']} SMs; " if machine.get("sm_count") else ""
        where = f"{machine['gpu']} ({sms}host: {host})"
    else:
        where = f"CPU {machine.get('cpu') or 'unknown'} ({host})"
    soft = ", ".join(f"{name} {versions[key]}" for key, name in
                     (("torch", "torch"), ("triton", "Triton"), ("cuda", "CUDA"))
                     if versions.get(key))
    date = (results.get("date") or "an unrecorded date")[:10]
    return f"{where}, {soft + ', ' if soft else ''}{date}"


def _md_table(headers: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def _num(x, fmt: str | None = None) -> str:
    if x is None:
        return "-"
    return format(x, fmt) if fmt else _report().fmt_number(x)


def _share(x) -> str:
    """0.085 -> "8.5%", 0.6 -> "60%"."""
    if x is None:
        return "-"
    p = 100 * x
    return f"{p:.0f}%" if p >= 9.95 else f"{p:.1f}%"


def _quantized(row: dict) -> str | None:
    """The row's quantization method ("gptq"), None for weights as loaded."""
    return ((row.get("engine_args") or {}).get("quantization")
            or (row.get("config") or {}).get("quantization")
            or ("gptq" if row.get("setting") == "gptq" else None))


_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _weights_text(row: dict) -> str:
    """What the row's linear weights were: "4-bit GPTQ", or their dtype ("bf16"; the
    engine's dtype "auto" is bf16 on CUDA, fp32 on the CPU)."""
    method = _quantized(row)
    if method:
        return "4-bit GPTQ" if method == "gptq" else method
    config = row.get("config") or {}
    dtype = config.get("dtype") or "auto"
    if dtype == "auto":
        device = config.get("device") or (row.get("engine_args") or {}).get("device")
        dtype = "bfloat16" if device == "cuda" else "float32" if device == "cpu" else "auto"
    return _DTYPE_NAMES.get(dtype, dtype)


def _profile_stage(row: dict, weights: bool = False) -> str:
    """The stage; with `weights`, what its weights were (a file with quantized rows);
    and for a stage that can replay CUDA graphs, whether this row did."""
    stage = next((s for s in ALL_STAGES if s.package == row.get("stage")), None)
    name = f"`{row.get('stage') or row.get('row')}`"
    notes = [_weights_text(row)] if weights else []
    graphs_possible = stage is not None and "flash_attn" in stage.features
    launches = row.get("graph_launches_per_step")
    if launches is not None and (graphs_possible or row.get("setting") is not None):
        notes.append("CUDA graphs" if launches > 0 else "eager")
    elif launches is None and row.get("setting") in ("graphs", "eager"):
        # a row that failed: what it was asked to run
        notes.append("CUDA graphs" if row["setting"] == "graphs" else "eager")
    if row.get("setting") == "async":
        notes.append("async scheduling")
    return name + (f" ({', '.join(notes)})" if notes else "")


def _profile_table(options: dict[str, str], where: str) -> str:
    results, path = _tool_results(options, where, "tools/profile_step.py", "wall_ms")
    # Mixed steps (--mixed-budget) get dearer from one step to the next: each chunk of the
    # long prompt attends to every chunk before it. The unprofiled steps (wall ms) come
    # first and the profiled ones (CPU, GPU) after them, so a row's GPU and CPU times are
    # set against the wall time of the same, profiled, steps.
    mixed = any(row.get("mixed_budget") for row in results["rows"])
    weights = any(_quantized(row) for row in results["rows"])
    headers = ["stage", "batch", "wall ms/step", "CPU ms", "GPU ms", "GPU busy", "kernels/step"]
    if mixed:
        headers[3:3] = ["profiled wall ms"]
    # back to back (the host's work may overlap the GPU's): where rows compare async scheduling
    steady = any(row.get("setting") == "async" for row in results["rows"])
    if steady:
        headers[3:3] = ["back to back ms/step"]
    body, events = [], False
    for row in results["rows"]:
        name = _profile_stage(row, weights)
        if row.get("error"):
            body.append([name, str(row.get("batch")), "failed"] + ["-"] * (len(headers) - 3))
            continue
        gpu = _num(row.get("gpu_ms"))
        if row.get("gpu_ms") is not None and \
                not str(row.get("gpu_time_source", "profiler")).startswith("profiler"):
            gpu, events = gpu + "*", True
        cells = [name, str(row.get("batch")), _num(row.get("wall_ms"))]
        if steady:
            cells.append(_num(row.get("steady_ms")))
        if mixed:
            profiled = row.get("wall_ms_profiled")
            busy = (row["gpu_ms"] / profiled if profiled and row.get("gpu_ms") is not None
                    else None)
            cells += [_num(profiled), _num(row.get("cpu_ms_profiled")), gpu, _share(busy)]
        elif steady:  # busy back to back: the steps' GPU time over their time in a row
            busy = (row["gpu_ms"] / row["steady_ms"] if row.get("steady_ms")
                    and row.get("gpu_ms") is not None else None)
            cells += [_num(row.get("cpu_ms")), gpu, _share(busy)]
        else:
            cells += [_num(row.get("cpu_ms")), gpu, _share(row.get("gpu_busy"))]
        body.append(cells + [_num(row.get("kernels_per_step"), ".0f")])
    steps = (f", the median of {results['steps']} steps" if results.get("steps") else "")
    prompt = (f" after {results['prompt_len']}-token prompts" if results.get("prompt_len") else "")
    budgets = {row.get("mixed_budget") for row in results["rows"]} - {None}
    kind = (f"Mixed steps (the batch's decodes and a chunk of a long prompt, "
            f"{'/'.join(map(str, sorted(budgets)))} tokens in all)" if budgets
            else "Decode steps")
    caption = (f"{kind} of `{results.get('model')}`{prompt}{steps}, on "
               f"{_machine_text(results)}.")
    lines = [caption, "", _md_table(headers, body, right_from=1)]
    n = results.get("steps")
    steps = f"{n} steps" if n else "steps"
    if mixed:
        lines.append(
            f"<small>Each step costs more than the one before it (the long prompt's next "
            f"chunk attends to all its earlier chunks). Wall ms/step: {steps} without the "
            f"profiler, right after the long prompt arrived; the next columns: {steps} "
            "later, under the profiler, which adds its own cost to their wall time. "
            "CPU ms: that profiled wall time less the time the host waited for the GPU; GPU "
            "busy: the GPU ms over the profiled wall time of the same steps.</small>\n")
    else:
        lines.append(
            "<small>Wall ms/step: the host's time around a step, without the profiler"
            + (", the GPU idle before it; back to back: the same steps run one after the "
               "other, over their count (async scheduling overlaps them here)" if steady
               else "") + "; CPU "
            "ms: that less the time a profiled step waited for the GPU; GPU ms: the "
            "kernels' summed time; GPU busy: GPU ms over "
            + ("back-to-back ms" if steady else "wall ms") + ".</small>\n")
    if events:
        lines.append("<small>* GPU ms from CUDA events around the step (the profiler did not "
                     "see the kernels inside the graph): it includes idle gaps.</small>\n")
    return "\n".join(lines) + "\n" + provenance(results, path)


def _memory_table(options: dict[str, str], where: str) -> str:
    """tools/activation_memory.py's rows: the peak memory of one long prompt's steps."""
    results, path = _tool_results(options, where, "tools/activation_memory.py", "row")
    headers = ["stage", "CUDA graphs", "token budget", "chunked prefill",
               "peak above weights and cache, MiB", "graph pool, MiB"]
    body = []
    for row in results["rows"]:
        stage = f"`{row.get('stage', row['row'])}`"
        if row.get("error"):
            body.append([stage, "-", "-", "-", "failed", "-"])
            continue
        body.append([stage, "no" if row.get("enforce_eager") else "yes",
                     str(row.get("max_num_batched_tokens")),
                     "on" if row.get("enable_chunked_prefill") else "off",
                     _num(row.get("peak_activation_mib"), ".0f"),
                     _num(row.get("graph_pool_mib"), ".0f")])
    caption = (f"One prompt of {results.get('prompt_len')} tokens on `{results.get('model')}`, "
               f"one token generated, on {_machine_text(results)}.")
    return "\n".join([caption, "", _md_table(headers, body, right_from=2)]) + "\n" \
        + provenance(results, path)


def _kernel_status(row: dict) -> str | None:
    """None for a row that ran and was right; else what went wrong."""
    if row.get("skipped"):
        return "skipped"
    if row.get("error"):
        return "failed"
    return None if row.get("ok") else "WRONG"


def _kernel_shapes(rows: list[dict]) -> str:
    shapes = {}
    for row in rows:
        if row.get("heads") is not None:
            shapes.setdefault(row["model"],
                              (row["heads"], row.get("kv_heads"), row.get("head_dim")))
    return "; ".join(f"`{m}`: {h} query heads, {kv} KV heads, head_dim {d}"
                     for m, (h, kv, d) in shapes.items())


def _goal_line(goal: dict | None, what: str, fmt) -> str:
    """The file's goal for a table: the target, over which rows, the lowest measured."""
    if not goal or goal.get("min") is None:
        return ""
    met = "met" if goal.get("met") else "not met"
    return (f"<small>Goal for {goal.get('rows')}: {what} at least {fmt(goal['target'])}; "
            f"the lowest there is {fmt(goal['min'])}: {met}.</small>\n")


def _decode_part(results: dict) -> str:
    rows = [r for r in results["rows"] if r["kind"] == "decode"]
    with_m3 = any(r.get("m3_us") is not None for r in rows)
    with_read = any(r.get("read_fraction") is not None for r in rows)
    # with the share of the read bandwidth, GB/s leaves (both shares say it; 8 columns fit)
    headers = ["model", "batch", "context", "splits", "µs"] + ([] if with_read else ["GB/s"])
    headers += ["% of copy"] + (["% of read"] if with_read else [])
    headers += ["M3 path µs"] if with_m3 else []
    body = []
    for r in rows:
        bad = _kernel_status(r)
        cells = [r["model"], str(r.get("batch")), str(r.get("context")),
                 _num(r.get("num_splits"), "d"),
                 bad or _num(r.get("kernel_us"), ".1f")]
        if not with_read:
            cells.append("-" if bad else _num(r.get("gbps"), ".0f"))
        cells.append("-" if bad else _share(r.get("copy_fraction")))
        if with_read:
            cells.append("-" if bad else _share(r.get("read_fraction")))
        if with_m3:
            m3_bad = r.get("m3_ok") is False
            cells.append("WRONG" if m3_bad else _num(r.get("m3_us"), ".1f"))
        body.append(cells)
    bandwidth = results.get("copy_bandwidth_gbps")
    copy = (f"; % of copy: the KV bytes read per second over the copy bandwidth of this GPU "
            f"({bandwidth:.0f} GB/s, a device-to-device copy)" if bandwidth else "")
    read_bw = results.get("read_bandwidth_gbps")
    if with_read and read_bw:
        copy += (f"; % of read: over the read bandwidth ({read_bw:.0f} GB/s, a kernel that "
                 "only reads 1 GiB). A decode kernel only reads, and HBM serves reads alone "
                 "faster than a copy's mix of reads and writes, so its share of the copy "
                 "bandwidth can pass 100% (the L2 is emptied before every call)")
    m3 = ("; M3 path: gather the keys through the block table, then torch's SDPA, eager "
          "(its metadata build not counted)" if with_m3 else "")
    return (f"**Decode** (`paged_decode_attention`, one query per sequence, in "
            f"{results.get('dtype') or 'an unrecorded dtype'}){copy}{m3}.\n\n"
            + _md_table(headers, body, right_from=1) + "\n"
            + _goal_line((results.get("goals") or {}).get("decode_copy_fraction"),
                         "a share of the copy bandwidth of", _share))


def _prefill_part(results: dict) -> str:
    rows = [r for r in results["rows"] if r["kind"] == "prefill"]
    headers = ["model", "prompts × length", "µs", "TFLOP/s", "SDPA flash TFLOP/s", "ratio"]
    body = []
    for r in rows:
        bad = _kernel_status(r)
        body.append([r["model"], f"{r.get('prompts')} × {r.get('prompt_len')}",
                     bad or _num(r.get("kernel_us"), ".1f"),
                     "-" if bad else _num(r.get("tflops"), ".1f"),
                     "WRONG" if r.get("sdpa_ok") is False else _num(r.get("sdpa_tflops"), ".1f"),
                     "-" if bad else _num(r.get("ratio_vs_sdpa"), ".2f")])
    return ("**Prefill** (`paged_attention`, causal prompts read from the paged cache) beside "
            "torch's flash SDPA on the same queries, keys and values laid out contiguously; "
            "ratio: our TFLOP/s over SDPA's.\n\n" + _md_table(headers, body, right_from=2) + "\n"
            + _goal_line((results.get("goals") or {}).get("prefill_vs_sdpa"), "a ratio of",
                         lambda x: f"{x:.2f}"))


def _kernel_table(options: dict[str, str], where: str) -> str:
    part = options.get("part")
    if part not in (None, "decode", "prefill"):
        raise ValueError(f"{where}: part= is decode or prefill, not {part!r}")
    results, path = _tool_results(options, where, "bench/attention_kernels.py", "kind")
    parts = [part] if part else ["decode", "prefill"]
    missing = [p for p in parts if not any(r["kind"] == p for r in results["rows"])]
    if missing:
        raise ValueError(f"{where}: {options['file']} has no {' or '.join(missing)} rows")
    caption = (f"Attention kernels alone, on {_machine_text(results)}; "
               f"{_kernel_shapes(results['rows'])}; blocks of {results.get('block_size')} "
               "tokens scattered through the pool.")
    lines = [caption, ""]
    if not results.get("timings_meaningful", True):
        lines += [("<small>These timings mean nothing: the kernels ran under the Triton "
                   "interpreter on a CPU.</small>"), ""]
    for p in parts:
        lines.append(_decode_part(results) if p == "decode" else _prefill_part(results))
    return "\n".join(lines) + "\n" + provenance(results, path)


# -- step timelines (tools/trace_steps.py) ---------------------------------------------
_TIMELINE = "-timeline"  # the plot-name suffix of a step timeline


def _trace_options(options: dict[str, str], where: str) -> dict[str, str]:
    """file= as a name in the results folder (a leading bench/results/ is dropped)."""
    name = options["file"].removeprefix("bench/results/")
    if "/" in name:
        raise ValueError(f"{where}: file= names a file of bench/results/ (NAME.json or "
                         f"bench/results/NAME.json), not {options['file']!r}")
    return dict(options, file=name)


def _trace_rows(results: dict, rows: str | None, where: str) -> list[dict]:
    """The rows of a trace file, only the named ones (in the file's order) with rows=."""
    if rows is None:
        return results["rows"]
    have = [row.get("row") for row in results["rows"]]
    wanted = [name for name in rows.split(",") if name]
    missing = [name for name in wanted if name not in have]
    if missing:
        raise ValueError(f"{where}: the file has no row {', '.join(missing)} "
                         f"(it has {', '.join(map(str, have))})")
    return [row for row in results["rows"] if row.get("row") in wanted]


def step_timelines(docs_dir: Path) -> dict[str, bytes]:
    """File name -> PNG of every step timeline the pages ask for, drawn from the trace
    files when the site is built (`tools/trace_steps.py`'s plot_timeline)."""
    wanted = set()
    for _, args, where in page_markers(docs_dir, "step-timeline"):
        options = _trace_options(_options(args, where), where)
        wanted.add((results_dir() / options["file"], options.get("rows"), where))
    plots = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path, rows, where in sorted(wanted, key=lambda w: (w[0].name, w[1] or "", w[2])):
            if not path.is_file():
                continue  # the marker itself reports the missing file
            results = json.loads(path.read_text(encoding="utf-8"))
            png = Path(tmp) / "timeline.png"
            trace_steps.plot_timeline(_trace_rows(results, rows, where), png)
            plots[_plot_name(path, rows, _TIMELINE)] = png.read_bytes()
    return plots


def _step_timeline(options: dict[str, str], page, where: str) -> str:
    """The step timeline of a trace file (drawn by step_timelines), with its caption."""
    options = _trace_options(options, where)
    results, path = _tool_results(options, where, "tools/trace_steps.py", "steps")
    rows = _trace_rows(results, options.get("rows"), where)
    labels = [row["row"] for row in rows]
    names = " and ".join(filter(None, [", ".join(labels[:-1]), labels[-1]]))
    name = _plot_name(path, options.get("rows"), _TIMELINE)
    prefix = "../" * page.file.src_uri.count("/")
    alt = (f"Step timeline of {names}: in each engine step, which requests ran and how "
           "(decodes, whole prompts, prompt chunks), and the step's tokens against the "
           "token budget")
    budgets = ", ".join(sorted({str(row.get("budget")) for row in rows}))
    return (f"\n![{alt}]({prefix}{PLOTS_URI}/{name})\n\n"
            f"<small>Engine steps of `{results.get('model')}` with a token budget "
            f"(`max_num_batched_tokens`) of {budgets} per step, the same requests arriving "
            "at the same steps in every panel: one line of cells per request (a grey "
            "triangle where it arrived), one column per step, a dot where the step gave "
            "the request a token; the bars above are the tokens each step computed (red: "
            f"over the budget). Recorded on {_machine_text(results)}; the picture counts "
            "steps, not seconds, so another machine draws the same one.</small>\n\n"
            + provenance(results, path))


# -- M7: perplexity, quantization error, GPTQ kernels --------------------------------
def _results_json(name: str, where: str) -> tuple[dict, Path]:
    """A JSON file of the results folder, as a dict, and its path."""
    path = results_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"no results file {name} in {_shown_path(results_dir())}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{where}: {name} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{where}: {name} holds {type(data).__name__}, not a results object")
    return data, path


def _quantization_text(cfg: dict | None) -> str:
    """{"bits": 4, "group_size": 64, "desc_act": true, ...} -> "4-bit, groups of 64,
    act-order"; None -> "none"."""
    if not cfg:
        return "none"
    size = cfg.get("group_size")
    parts = [f"{cfg.get('bits')}-bit",
             "per channel" if size == -1 else f"groups of {size}"]
    parts += ["act-order"] if cfg.get("desc_act") else []
    parts += [] if cfg.get("sym", True) else ["asymmetric"]
    return ", ".join(parts)


_TEXTS = {"stdlib:heldout": "the held-out half of the standard library's docstrings and "
                            "comments (`m7_gptq/calibration.py`)",
          "stdlib:calibration": "the calibration half of the standard library's docstrings "
                                "and comments (`m7_gptq/calibration.py`)"}


def _ppl_table(options: dict[str, str], where: str) -> str:
    """The perplexities of `python -m m7_gptq.eval_ppl --out`: one row per model."""
    results, path = _results_json(options["file"], where)
    rows = results.get("results")
    if not rows or not all(isinstance(r, dict) and "perplexity" in r for r in rows):
        raise ValueError(f"{where}: {options['file']} is not a results file of "
                         "python -m m7_gptq.eval_ppl (it needs results that each have "
                         "'perplexity')")
    base = rows[0]["perplexity"]
    made = [(r, _checkpoint_of(r, options["file"], where)) for r in rows if r.get("quantization")]
    body = []
    for r in rows:
        name = r.get("label") or f"`{r.get('model')}`"
        method = r.get("method") or (r.get("checkpoint") or {}).get("method")
        body.append([name, method or "-" if r.get("quantization") else "-",
                     _quantization_text(r.get("quantization")), f"{r['perplexity']:.3f}",
                     f"{r['perplexity'] - base:+.3f}", str(r.get("tokens", "-"))])
    if not any(cells[1] != "-" for cells in body):  # files that do not name the method
        body = [cells[:1] + cells[2:] for cells in body]
        headers = ["model", "quantization", "perplexity", "vs first", "tokens"]
    else:
        headers = ["model", "method", "quantization", "perplexity", "vs first", "tokens"]
    text = results.get("text") or "stdlib:heldout"
    text = _TEXTS.get(text, f"`{text}`")
    seq_len = results.get("seq_len") or rows[0].get("seq_len")
    caption = (f"Perplexity (lower is better) on {text}, in windows of {seq_len} tokens, "
               f"each scored through the engine; on {_machine_text(results)}.")
    out = [caption, "", _md_table(headers, body, right_from=len(headers) - 3)]
    if made:
        out += ["", "Each checkpoint was made first, by the command under its name; the "
                "perplexity run below reads the folders they write."]
    for (r, log), label in zip(made, _log_labels([log for _, log in made])):
        out += ["", _made_by(log, f"**{label}** (`{r.get('model')}`)")]
    return "\n".join(out) + "\n\n" + provenance(results, path)


def _checkpoint_of(row: dict, name: str, where: str) -> dict:
    """A quantized row's record of how its checkpoint was made (its quantize_log.json as
    eval_ppl copied it), which must name the command and the commit."""
    log = row.get("checkpoint")
    if not isinstance(log, dict) or not log.get("command") or not log.get("git_commit"):
        raise ValueError(f"{where}: {name}: {row.get('model')} does not record the command "
                         "and git commit that made it (eval_ppl copies them from the "
                         "checkpoint's quantize_log.json)")
    return log


def _made_by(log: dict, label: str) -> str:
    """A label, the commit and time a quantize log records, and its command, --out kept."""
    took = (f", {log['seconds']:.0f} s on {log.get('device', 'an unrecorded device')}"
            if isinstance(log.get("seconds"), (int, float)) else "")
    return "\n".join([f"<small>{label}: made at commit {_commit_text(log)}{took}.</small>",
                      "", "```bash", reproduce_command(log, keep=("--out",)), "```"])


def _files_option(args: str, where: str) -> list[str]:
    words = args.split()
    if len(words) != 1 or not words[0].startswith("files="):
        raise ValueError(f"{where}: use files=A.json,B.json: quantize logs "
                         "(quantize_log.json of python -m m7_gptq.quantize) copied into "
                         "bench/results/, one per method")
    files = [name for name in words[0][len("files="):].split(",") if name]
    if not files:
        raise ValueError(f"{where}: files= names no file")
    return files


_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quant_log(name: str, where: str) -> tuple[dict, Path]:
    """A quantize log (`python -m m7_gptq.quantize`'s quantize_log.json), checked."""
    log, path = _results_json(name, where)
    layers = log.get("layers")
    if not layers or not all(isinstance(layer, dict) and isinstance(layer.get("errors"), dict)
                             and layer["errors"] for layer in layers):
        raise ValueError(f"{where}: {name} is not a quantize log of python -m m7_gptq.quantize "
                         "(it needs layers that each have errors)")
    if not log.get("command") or not log.get("git_commit"):
        raise ValueError(f"{where}: {name} does not record the command and git commit "
                         "that made it (python -m m7_gptq.quantize's log records both)")
    return log, path


def _log_labels(logs: list[dict]) -> list[str]:
    """"RTN", "GPTQ", "GPTQ + act-order"; with the grid when the logs' grids differ."""
    labels = [str(log.get("method", "?")).upper()
              + (" + act-order" if (log.get("quantization_config") or {}).get("desc_act")
                 else "") for log in logs]
    grids = [_quantization_text({**(log.get("quantization_config") or {}), "desc_act": False})
             for log in logs]
    if len(set(grids)) > 1 or len(set(labels)) < len(labels):
        labels = [f"{label} ({grid})" for label, grid in zip(labels, grids)]
    return labels


def _layer_means(log: dict) -> list[tuple[int, float]]:
    return [(layer.get("layer", i), sum(layer["errors"].values()) / len(layer["errors"]))
            for i, layer in enumerate(log["layers"])]


def _quant_error_name(files: list[str]) -> str:
    import hashlib

    return f"quant-error-{hashlib.sha256(','.join(files).encode()).hexdigest()[:12]}.png"


def quant_error_plots(docs_dir: Path) -> dict[str, bytes]:
    """File name -> PNG of every quant-error plot the pages ask for, drawn from the logs
    when the site is built: the mean relative output error of each decoder layer's
    linears, one line per log."""
    wanted = {}
    for _, args, where in page_markers(docs_dir, "quant-error"):
        files = _files_option(args, where)
        wanted[_quant_error_name(files)] = (files, where)
    plots = {}
    if not wanted:
        return plots
    plt = _pyplot()

    with tempfile.TemporaryDirectory() as tmp:
        for name, (files, where) in sorted(wanted.items()):
            if not all((results_dir() / f).is_file() for f in files):
                continue  # the marker itself reports the missing file
            logs = [_quant_log(f, where)[0] for f in files]
            fig, ax = plt.subplots(figsize=(8, 4))
            for log, label in zip(logs, _log_labels(logs)):
                points = _layer_means(log)
                ax.plot([x for x, _ in points], [y for _, y in points], "o-", markersize=3,
                        label=label)
            ax.set_yscale("log")
            ax.set_xlabel("decoder layer")
            ax.set_ylabel("relative output error")
            ax.set_title("||WX - QX||² / ||WX||² on the calibration inputs, "
                         "mean of the layer's 7 linears", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
            fig.tight_layout()
            png = Path(tmp) / "errors.png"
            fig.savefig(png, dpi=110)
            plt.close(fig)
            plots[name] = png.read_bytes()
    return plots


def _quant_error(files: list[str], page, where: str) -> str:
    """The per-layer error plot (drawn by quant_error_plots), a table of the mean error
    per kind of linear, and where each log came from."""
    loaded = [_quant_log(name, where) for name in files]
    logs = [log for log, _ in loaded]
    labels = _log_labels(logs)
    body = []
    kinds = [k for k in _LINEARS if any(name.endswith(k) for log in logs
                                        for layer in log["layers"] for name in layer["errors"])]
    for kind in kinds + ["all"]:
        cells = [f"`{kind}`" if kind != "all" else "all linears"]
        for log in logs:
            values = [e for layer in log["layers"] for name, e in layer["errors"].items()
                      if kind == "all" or name.endswith(kind)]
            cells.append(f"{sum(values) / len(values):.2e}" if values else "-")
        body.append(cells)
    prefix = "../" * page.file.src_uri.count("/")
    alt = ("Relative output error of each decoder layer's linears, mean of seven, per "
           f"method: {', '.join(labels)}")
    first = logs[0]
    grids = {_quantization_text({**(log.get("quantization_config") or {}), "desc_act": False})
             for log in logs}
    setting = (f"{grids.pop()}; " if len(grids) == 1 else "")
    calib = (f"{first.get('num_samples')} sequences of {first.get('seq_len')} tokens of "
             f"{_TEXTS.get(first.get('calibration'), first.get('calibration'))}")
    out = [f"\n![{alt}]({prefix}{PLOTS_URI}/{_quant_error_name(files)})\n",
           f"<small>`{first.get('model')}`, {setting}each linear's relative output error "
           f"‖WX − QX‖² / ‖WX‖² on its calibration inputs, {calib}, as the quantizer "
           "logged it; the table gives the mean over the layers per kind of linear.</small>",
           "", _md_table(["linear"] + labels, body, right_from=1)]
    for (log, path), label in zip(loaded, labels):
        out += ["", _made_by(log, f"**{label}**, from `{_shown_path(path)}`")]
    return "\n".join(out) + "\n"


_BATCH = "-batch.png"  # a gptq-batch-figure's file name ends so


def _gptq_batch_name(file: str, model: str) -> str:
    return f"{Path(file).stem}-{model}{_BATCH}"


def _layer_costs(results: dict, model: str) -> tuple[int, int, int] | None:
    """(weights, bf16 bytes, 4-bit bytes) of one decoder layer's linears of `model`, from
    the file's shape sets (None where the file has none): what the roofline reads."""
    linears = ((results.get("shape_sets") or {}).get(model) or {}).get("linears")
    if not linears:
        return None
    bits, group = results.get("bits", 4), results.get("group_size", 64)
    weights = sum(s["k"] * s["n"] * s["count"] for s in linears)
    # codes, and per group and column a 16-bit scale and a packed zero point
    quantized = weights * bits // 8 + weights // group * 2 + weights // group * bits // 8
    return weights, 2 * weights, quantized


def _ridge(nbytes: int, weights: int, roofline: dict) -> float:
    """The M where a layer's matmul time (2 M weights flops at the matmul rate) equals
    the time to read its bytes: below it, reading the weight bounds the time."""
    return nbytes * roofline["matmul_tflops"] * 1e12 / (
        2 * weights * roofline["bandwidth_gbps"] * 1e9)


def gptq_batch_plots(docs_dir: Path) -> dict[str, bytes]:
    """File name -> PNG of every gptq-batch-figure the pages ask for: a decoder layer's
    linears in bf16 and in 4 bits against M (left: microseconds; right: the speed-up),
    measured, with the roofline's bound and its regions where the file has the card's."""
    wanted = {}
    for _, args, where in page_markers(docs_dir, "gptq-batch-figure"):
        options = _options(args, where, allowed=("file", "model"))
        if "file" in options and "model" in options:  # else the marker says so
            wanted[_gptq_batch_name(options["file"], options["model"])] = (options, where)
    plots = {}
    if not wanted:
        return plots
    plt = _pyplot()

    with tempfile.TemporaryDirectory() as tmp:
        for name, (options, where) in sorted(wanted.items()):
            if not (results_dir() / options["file"]).is_file():
                continue  # the marker itself reports the missing file
            results, _ = _tool_results(options, where, "tools/bench_gptq_kernels.py", "kind")
            rows = [r for r in _gptq_model_rows(results, options, where, ("layer",))
                    if r.get("ok") and r.get("torch_us") and r.get("gptq_us")]
            fig = _draw_gptq_batch(plt, rows, results, options["model"])
            png = Path(tmp) / "batch.png"
            fig.savefig(png, dpi=110)
            plt.close(fig)
            plots[name] = png.read_bytes()
    return plots


def _draw_gptq_batch(plt, rows: list[dict], results: dict, model: str):
    """The figure of gptq_batch_plots: measured points, and with the card's roofline its
    bound for each weight format and the three regions between their ridges."""
    import numpy as np

    ms = [r["m"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    bits = results.get("bits", 4)
    left.plot(ms, [r["torch_us"] for r in rows], "o-", color="tab:blue", label="bf16")
    left.plot(ms, [r["gptq_us"] for r in rows], "s-", color="tab:orange",
              label=f"{bits}-bit")
    right.plot(ms, [r["torch_us"] / r["gptq_us"] for r in rows], "s-", color="tab:orange",
               label="measured")
    roofline, costs = results.get("roofline"), _layer_costs(results, model)
    if roofline and costs and ms:
        weights, dense, quantized = costs
        grid = np.geomspace(min(ms), max(ms), 200)
        bound = {kind: np.maximum(nbytes / (roofline["bandwidth_gbps"] * 1e3),
                                  2 * grid * weights / (roofline["matmul_tflops"] * 1e6))
                 for kind, nbytes in (("bf16", dense), ("q", quantized))}  # µs
        left.plot(grid, bound["bf16"], "--", color="tab:blue", alpha=0.6,
                  label="bf16 roofline")
        left.plot(grid, bound["q"], "--", color="tab:orange", alpha=0.6,
                  label=f"{bits}-bit roofline")
        right.plot(grid, bound["bf16"] / bound["q"], "--", color="grey", label="roofline")
        ridges = [_ridge(quantized, weights, roofline), _ridge(dense, weights, roofline)]
        edges = [min(ms)] + [min(max(r, min(ms)), max(ms)) for r in ridges] + [max(ms)]
        shades = ("#e8f4e8", "#fdf3e1", "#f3e6f3")
        names = ("both read-bound", f"{bits}-bit compute-, bf16 read-bound",
                 "both compute-bound")
        for (lo, hi), shade, label in zip(zip(edges, edges[1:]), shades, names):
            if hi > lo:
                left.axvspan(lo, hi, color=shade, zorder=0)
                right.axvspan(lo, hi, color=shade, zorder=0, label=label)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows M (tokens in the step)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("µs per decoder layer's linears")
    right.set_ylabel(f"speed-up of {bits}-bit over bf16")
    right.axhline(1.0, color="black", linewidth=0.8)
    fig.suptitle(f"{model}: a decoder layer's linears, bf16 and {bits}-bit", fontsize=10)
    fig.tight_layout()
    return fig


def _gptq_batch_figure(options: dict[str, str], page, where: str) -> str:
    """The picture that gptq_batch_plots draws, with its caption and the file's
    provenance."""
    if "model" not in options:
        raise ValueError(f"{where}: model= is required: the model whose shapes to draw")
    results, path = _tool_results(options, where, "tools/bench_gptq_kernels.py", "kind")
    rows = _gptq_model_rows(results, options, where, ("layer",))
    bits, model = results.get("bits", 4), options["model"]
    prefix = "../" * page.file.src_uri.count("/")
    alt = (f"{model}: a decoder layer's linears in bf16 and in {bits} bits against the "
           "number of rows M, with the roofline")
    roofline = ("The dashed lines are the roofline of the card as measured in the same run "
                "(copy bandwidth, bf16 matmul rate): the longer of reading the weight and "
                "computing the product. In the green region both are bound by reading "
                f"their weight, and {bits} bits read a fraction of bf16's bytes; in the "
                f"orange one the {bits}-bit product is bound by computing while bf16 still "
                f"reads; in the purple one both compute, and {bits} bits buy nothing. "
                if results.get("roofline") and _layer_costs(results, model) else
                "The file has no roofline of its card, so none is drawn. ")
    return (f"\n![{alt}]({prefix}{PLOTS_URI}/{_gptq_batch_name(options['file'], model)})\n\n"
            f"<small>The sum over a decoder layer's {rows[0].get('linears')} linears of "
            f"`{model}`, x [M, K] in bf16 times the weight in bf16 (`torch.matmul`) or in "
            f"{bits} bits (M7's `gptq_matmul`), on {_machine_text(results)}. {roofline}"
            "</small>\n\n" + provenance(results, path))


def _gptq_model_rows(results: dict, options: dict[str, str], where: str,
                     kinds: tuple[str, ...]) -> list[dict]:
    """The rows of `kinds` of the model that `model=` names; a file of one model's shapes
    (older ones name none) needs no `model=`."""
    rows = [r for r in results["rows"] if r["kind"] in kinds]
    models = list(dict.fromkeys(r.get("model") for r in rows))
    wanted = options.get("model")
    if wanted is None and len(models) > 1:
        raise ValueError(f"{where}: {options['file']} has the shapes of "
                         f"{', '.join(map(str, models))}: say which with model=")
    if wanted is not None:
        rows = [r for r in rows if r.get("model") == wanted]
    if not any(r["kind"] == kinds[0] for r in rows):
        raise ValueError(f"{where}: {options['file']} has no {kinds[0]} rows"
                         + (f" of model {wanted}" if wanted else ""))
    return rows


def _gptq_kernel_table(options: dict[str, str], where: str) -> str:
    """tools/bench_gptq_kernels.py's shape and layer rows, M by M."""
    results, path = _tool_results(options, where, "tools/bench_gptq_kernels.py", "kind")
    rows = _gptq_model_rows(results, options, where, ("shape", "layer"))
    bits, group = results.get("bits", 4), results.get("group_size", 64)
    dtype = str(results.get("dtype") or "bfloat16")
    dense = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
    headers = ["M", "linears", "K × N", f"{dense} µs", f"{bits}-bit µs", f"{dense} GB/s",
               f"{bits}-bit GB/s", "speed-up"]
    body = []
    for r in rows:
        if r["kind"] == "layer":
            body.append([str(r.get("m")), f"**layer** ({r.get('linears')} linears)", "",
                         _num(r.get("torch_us"), ".1f"),
                         _num(r.get("gptq_us"), ".1f") if r.get("ok") else "WRONG", "", "",
                         _num(r.get("ratio"), ".2f") + "×" if r.get("ok") and
                         r.get("ratio") is not None else "-"])
            continue
        bad = None if r.get("ok") else ("failed" if r.get("error") else "WRONG")
        body.append([str(r.get("m")), r.get("linears", ""), f"{r.get('k')} × {r.get('n')}",
                     _num(r.get("torch_us"), ".1f"), bad or _num(r.get("gptq_us"), ".1f"),
                     _num(r.get("torch_gbps"), ".0f"),
                     "-" if bad else _num(r.get("gptq_gbps"), ".0f"),
                     "-" if bad or r.get("ratio") is None else f"{r['ratio']:.2f}×"])
    caption = (f"Matrix products of one decoder layer's linear shapes, x [M, K] in "
               f"{dense}: `torch.matmul` with the weight in {dense}, and M7's `gptq_matmul` "
               f"with it in {bits} bits (groups of {group}), on {_machine_text(results)}. "
               f"GB/s: the weight's bytes read per second ({dense}: the whole weight; "
               f"{bits}-bit: the packed codes, scales and zeros); speed-up: the {dense} "
               f"time over the {bits}-bit one; **layer**: a decoder layer's linears "
               "summed.")
    lines = [caption, ""]
    if not results.get("timings_meaningful", True):
        lines += [("<small>These timings mean nothing: the kernels ran under the Triton "
                   "interpreter on a CPU.</small>"), ""]
    return "\n".join(lines + [_md_table(headers, body, right_from=3)]) + "\n" \
        + provenance(results, path)
