"""The diff between two stages, generated from the code (docs tooling, introduced with M1).

`python tools/stage_diff.py m0_init m1_basic` prints a unified diff per changed file,
like `diff -ru`, skipping `__pycache__`, compiled files and the stage's `LESSON`.
`--stat` prints only the file list with added/removed line counts; `--html` prints the
HTML fragment that the docs site shows in place of a `<!-- stage-diff: A B -->` marker
(`tools/mkdocs_hooks.py` calls `format_html`); `--tree A` prints a stage's file tree.
Everything is computed on each call, so the docs can never drift from the code.

A stage's `LESSON` is the manifest of the files its idea changes from the stage before
(tests/test_lessons.py checks that it matches the diff); `read_lesson` parses it:

    # M3 · paged KV: the idea in one line               <- the title: the first line
    # more comments ...
    ## the idea                                          <- the files that carry the idea,
    core/block_pool.py        # new: the free blocks         in reading order
    ## around it                                         <- the files that follow from it
    config.py                 # block_size, ...

Each path is relative to the stage folder and says why it changed in a `#` comment.
The docs page lists the idea's files first and the others after them, one closed block
per file whose summary line says why it changed. The code inside is kept out of the
site's search index (`data-search-exclude`): thousands of code tokens, many with digits,
are noise in a search and make the theme's search engine likely to break
(`tools/search_check.py` says how); the summary lines stay in it.
"""

from __future__ import annotations

import argparse
import difflib
import html
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # for exercises.regions, run as a script too
from exercises.regions import is_marker  # noqa: E402
_SKIP_DIRS = {"__pycache__", ".ipynb_checkpoints", ".pytest_cache"}
_SKIP_SUFFIXES = {".pyc", ".pyo", ".so"}
_SKIP_FILES = {"LESSON"}  # top-level only: the manifest, not code


# -- the diff -------------------------------------------------------------------------
@dataclass
class FileDiff:
    path: str  # relative to the stage folder, with "/" separators
    status: str  # "added", "removed" or "modified"
    lines: list[str]  # unified diff lines, without trailing newlines
    added: int
    removed: int


def stage_files(stage: str, root: Path = REPO_ROOT) -> list[str]:
    """Relative paths of a stage's source files, sorted; raises if the stage is missing."""
    base = root / stage
    if not base.is_dir():
        raise FileNotFoundError(f"no stage folder {base}")
    paths = []
    for path in base.rglob("*"):
        rel = path.relative_to(base)
        if path.is_file() and not (set(rel.parts) & _SKIP_DIRS) \
                and path.suffix not in _SKIP_SUFFIXES and rel.as_posix() not in _SKIP_FILES:
            paths.append(rel.as_posix())
    return sorted(paths)


def _read_lines(path: Path) -> list[str]:
    """A file's lines, without the exercise markers (`# exercise mN.K begin`/`end`: they
    mark code for `python -m exercises`, not a change of the stage)."""
    return [line for line in path.read_text(encoding="utf-8").splitlines()
            if not is_marker(line)]


def stage_diff(old: str, new: str, root: Path = REPO_ROOT, context: int = 3) -> list[FileDiff]:
    """One `FileDiff` per file that differs between two stage folders, sorted by path."""
    old_files, new_files = set(stage_files(old, root)), set(stage_files(new, root))
    diffs = []
    for rel in sorted(old_files | new_files):
        a = _read_lines(root / old / rel) if rel in old_files else []
        b = _read_lines(root / new / rel) if rel in new_files else []
        if a == b and rel in old_files and rel in new_files:
            continue
        from_name = f"{old}/{rel}" if rel in old_files else "/dev/null"
        to_name = f"{new}/{rel}" if rel in new_files else "/dev/null"
        lines = list(difflib.unified_diff(a, b, from_name, to_name, n=context, lineterm=""))
        status = ("added" if rel not in old_files else
                  "removed" if rel not in new_files else "modified")
        added = sum(1 for line in lines[2:] if line.startswith("+"))
        removed = sum(1 for line in lines[2:] if line.startswith("-"))
        diffs.append(FileDiff(rel, status, lines, added, removed))
    return diffs


# -- the LESSON manifest --------------------------------------------------------------
KEY_SECTION = "the idea"  # `## the idea`: the files that carry the stage's idea
REST_SECTION = "around it"  # `## around it`: the files that follow from it


@dataclass
class LessonEntry:
    path: str  # relative to the stage folder
    why: str  # the line's `#` comment: why this file changed ("" when there is none)
    key: bool  # listed under `## the idea` (else under `## around it`)


@dataclass
class Lesson:
    title: str  # the first line, without its "# "
    entries: list[LessonEntry]  # in the file's order


def parse_lesson(text: str, where: str = "LESSON") -> Lesson:
    """A LESSON's title and entries; raises ValueError naming `where` if it is malformed."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# ") or not lines[0][2:].strip():
        raise ValueError(f"{where}:1: the first line must be a `# ` comment saying the idea")
    entries, section = [], None
    for number, line in enumerate(lines[1:], start=2):
        stripped = line.strip()
        if stripped.startswith("##"):
            section = stripped.lstrip("#").strip()
            if section not in (KEY_SECTION, REST_SECTION):
                raise ValueError(f"{where}:{number}: unknown section {stripped!r}; use "
                                 f"`## {KEY_SECTION}` or `## {REST_SECTION}`")
            continue
        path, _, why = line.partition("#")
        if not path.strip():
            continue  # a blank or comment line
        if section is None:
            raise ValueError(f"{where}:{number}: {path.strip()} comes before any section; "
                             f"put it under `## {KEY_SECTION}` or `## {REST_SECTION}`")
        entries.append(LessonEntry(path.strip(), why.strip(), section == KEY_SECTION))
    return Lesson(lines[0][2:].strip(), entries)


def read_lesson(stage: str, root: Path = REPO_ROOT) -> Lesson:
    """The parsed `LESSON` of a stage folder (FileNotFoundError if it has none)."""
    path = root / stage / "LESSON"
    return parse_lesson(path.read_text(encoding="utf-8"), where=f"{stage}/LESSON")


# -- plain text -----------------------------------------------------------------------
def format_unified(diffs: list[FileDiff]) -> str:
    return "\n".join("\n".join(d.lines) for d in diffs) + ("\n" if diffs else "")


def format_stat(old: str, new: str, diffs: list[FileDiff]) -> str:
    width = max((len(d.path) for d in diffs), default=0)
    rows = [f"{d.path:<{width}}  {d.status:<8}  +{d.added} -{d.removed}" for d in diffs]
    total_add, total_rem = sum(d.added for d in diffs), sum(d.removed for d in diffs)
    rows.append(f"{len(diffs)} files changed from {old} to {new}: "
                f"+{total_add} -{total_rem} lines")
    return "\n".join(rows) + "\n"


# -- HTML for the docs site -----------------------------------------------------------
_HUNK = re.compile(r"^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@")
_LINE_CLASS = {"+": "diff-add", "-": "diff-del", " ": "diff-ctx"}


def anchor(path: str) -> str:
    """The HTML id of a file's block: `core/block_pool.py` -> `diff-core-block_pool-py`."""
    return "diff-" + re.sub(r"[^A-Za-z0-9_]+", "-", path).strip("-")


def _inline(text: str) -> str:
    """Escaped text, with `backticked` spans as <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _counts(d: FileDiff) -> str:
    return f"+{d.added} \u2212{d.removed}"


def _in_reading_order(diffs: list[FileDiff], lesson: Lesson | None
                      ) -> list[tuple[FileDiff, LessonEntry | None]]:
    """The idea's files in LESSON order, then the others in LESSON order, then unlisted."""
    by_path = {d.path: d for d in diffs}
    entries = lesson.entries if lesson else []
    listed = [e for e in entries if e.key] + [e for e in entries if not e.key]
    rows = [(by_path[e.path], e) for e in listed if e.path in by_path]
    seen = {e.path for e in listed}
    return rows + [(d, None) for d in diffs if d.path not in seen]


def _highlighted(path: Path, name: str) -> list[str]:
    """A file's lines as HTML: Pygments spans (closed at each line end), else escaped."""
    # Pygments comes with the docs tools (the dev extra); the plain diff needs none of it.
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import get_lexer_for_filename
    from pygments.util import ClassNotFound

    lines = _read_lines(path)
    try:
        lexer = get_lexer_for_filename(name, stripnl=False, ensurenl=True)
    except ClassNotFound:
        return [html.escape(line) for line in lines]
    out = highlight("\n".join(lines) + "\n", lexer, HtmlFormatter(nowrap=True))
    marked = out.split("\n")[:-1]
    return marked if len(marked) == len(lines) else [html.escape(line) for line in lines]


def _diff_line(kind: str, number: int | None, text: str) -> str:
    """One diff line in one element, ending with its newline (so copying keeps lines)."""
    num = f' data-n="{number}"' if number is not None else ""
    return f'<span class="diff-line {kind}"{num}>{text}\n</span>'


def _diff_lines(d: FileDiff, old_src: list[str], new_src: list[str]) -> list[str]:
    """Each line of `d` as HTML, the code taken from the highlighted old or new file."""
    out = [_diff_line("diff-file", None, html.escape(line)) for line in d.lines[:2]]
    old_i = new_i = 0  # 0-based line indices into the files
    for line in d.lines[2:]:
        hunk = _HUNK.match(line)
        if hunk:
            old_i, new_i = int(hunk.group(1)) - 1, int(hunk.group(2)) - 1
            out.append(_diff_line("diff-hunk", None, html.escape(line)))
            continue
        sign = line[:1]
        if sign == "-":
            code, number = old_src[old_i], old_i + 1
            old_i += 1
        else:  # "+" or " ": the line as it is in the new file
            code, number = new_src[new_i], new_i + 1
            old_i, new_i = old_i + (sign == " "), new_i + 1
        gutter = f'<span class="diff-sign">{html.escape(sign)}</span>'
        out.append(_diff_line(_LINE_CLASS[sign], number, gutter + code))
    return out


def _file_block(old: str, new: str, d: FileDiff, entry: LessonEntry | None,
                root: Path) -> str:
    """A file's collapsible block, closed: a summary line (the path, the change, why it
    changed), then its highlighted diff, which is kept out of the search index."""
    old_src = _highlighted(root / old / d.path, d.path) if d.status != "added" else []
    new_src = _highlighted(root / new / d.path, d.path) if d.status != "removed" else []
    why = f' <span class="stage-diff-why">{_inline(entry.why)}</span>' \
        if entry and entry.why else ""
    idea = " stage-diff-idea" if entry and entry.key else ""
    return "\n".join([
        f'<details id="{anchor(d.path)}" class="stage-diff{idea}">',
        f'<summary><code>{html.escape(d.path)}</code> <span class="stage-diff-stat">'
        f'{d.status}, {_counts(d)}</span>{why}</summary>',
        '<div class="highlight" data-search-exclude><pre><code><span class="diff-lines">'
        + "".join(_diff_lines(d, old_src, new_src))
        + "</span></code></pre></div>",
        "</details>",
    ])


def _intro(old: str, new: str, rows: list[tuple[FileDiff, LessonEntry | None]]) -> str:
    key = sum(1 for _, entry in rows if entry and entry.key)
    command = f"<code>python tools/stage_diff.py {html.escape(old)} {html.escape(new)}</code>"
    text = (f"Generated from the code when this site was built: {command} prints the same "
            f"diff. {len(rows)} files changed, "
            f"+{sum(d.added for d, _ in rows)} \u2212{sum(d.removed for d, _ in rows)} lines.")
    if key:
        text += (f" The first {key} carry the idea (the marked ones), in reading order; the "
                 f"other {len(rows) - key} follow from it.")
    text += " Click a file to open its diff."
    return f"<p>{text}</p>"


def format_html(old: str, new: str, diffs: list[FileDiff], lesson: Lesson | None = None,
                root: Path = REPO_ROOT) -> str:
    """The docs' HTML fragment: a line on where it comes from, then one closed
    `<details>` block per changed file: its path, change and line counts, and inside its
    Pygments-highlighted diff. With a `lesson` (normally `read_lesson(new)`) the idea's
    files come first (class `stage-diff-idea`) and every file says why it changed. The
    code is kept out of the search index; the summary lines are in it."""
    if not diffs:
        return (f"<p><code>{html.escape(old)}</code> and <code>{html.escape(new)}</code> "
                f"are identical.</p>\n")
    rows = _in_reading_order(diffs, lesson)
    blocks = [_file_block(old, new, d, entry, root) for d, entry in rows]
    return "\n".join([_intro(old, new, rows), *blocks]) + "\n"


# -- the file tree --------------------------------------------------------------------
def format_tree(stage: str, root: Path = REPO_ROOT) -> str:
    """The stage's files as an indented tree, with each file's line count."""
    lines = [f"{stage}/"]
    seen_dirs: set[str] = set()
    for rel in stage_files(stage, root):
        parts = rel.split("/")
        for depth in range(len(parts) - 1):
            folder = "/".join(parts[:depth + 1])
            if folder not in seen_dirs:
                seen_dirs.add(folder)
                lines.append("    " * (depth + 1) + parts[depth] + "/")
        count = len(_read_lines(root / stage / rel))
        lines.append("    " * len(parts) + f"{parts[-1]:<{max(1, 36 - 4 * len(parts))}} "
                     f"{count:>4} lines")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python tools/stage_diff.py",
        description="Print the diff between two stages (e.g. m0_init m1_basic).")
    p.add_argument("old", help="the earlier stage folder, e.g. m0_init")
    p.add_argument("new", nargs="?", help="the later stage folder, e.g. m1_basic")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--stat", action="store_true", help="only list files and line counts")
    group.add_argument("--html", action="store_true", help="the HTML the docs show")
    group.add_argument("--tree", action="store_true", help="print the file tree of OLD")
    p.add_argument("-U", "--context", type=int, default=3, help="context lines (default 3)")
    args = p.parse_args(argv)
    try:
        if args.tree:
            sys.stdout.write(format_tree(args.old))
            return 0
        if args.new is None:
            p.error("give two stages, e.g. m0_init m1_basic (or --tree STAGE)")
        diffs = stage_diff(args.old, args.new, context=args.context)
        lesson = read_lesson(args.new) if args.html else None
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.stat:
        sys.stdout.write(format_stat(args.old, args.new, diffs))
    elif args.html:
        sys.stdout.write(format_html(args.old, args.new, diffs, lesson))
    else:
        sys.stdout.write(format_unified(diffs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
