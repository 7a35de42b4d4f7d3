"""The diff between two stages, generated from the code (docs tooling, introduced with M1).

`python tools/stage_diff.py m0_init m1_basic` prints a unified diff per changed file,
like `diff -ru`, skipping `__pycache__`, compiled files and the stage's `LESSON` (its
manifest of the files that may differ, checked by tests/test_lessons.py). `--stat`
prints only the file list with added/removed line counts; `--markdown` prints the
Markdown that the docs site shows (what `tools/mkdocs_hooks.py` puts in place of a
`<!-- stage-diff: A B -->` marker). `--tree A` prints a stage's file tree. Everything is
computed on each call, so the docs can never drift from the code.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_SKIP_DIRS = {"__pycache__", ".ipynb_checkpoints", ".pytest_cache"}
_SKIP_SUFFIXES = {".pyc", ".pyo", ".so"}
_SKIP_FILES = {"LESSON"}  # top-level only: the manifest, not code


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
    return path.read_text(encoding="utf-8").splitlines()


def stage_diff(old: str, new: str, root: Path = REPO_ROOT, context: int = 3) -> list[FileDiff]:
    """One `FileDiff` per file that differs between two stage folders."""
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


def format_unified(diffs: list[FileDiff]) -> str:
    return "\n".join("\n".join(d.lines) for d in diffs) + ("\n" if diffs else "")


def format_stat(old: str, new: str, diffs: list[FileDiff]) -> str:
    width = max((len(d.path) for d in diffs), default=0)
    rows = [f"{d.path:<{width}}  {d.status:<8}  +{d.added} -{d.removed}" for d in diffs]
    total_add, total_rem = sum(d.added for d in diffs), sum(d.removed for d in diffs)
    rows.append(f"{len(diffs)} files changed from {old} to {new}: "
                f"+{total_add} -{total_rem} lines")
    return "\n".join(rows) + "\n"


def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run inside `text`."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def format_markdown(old: str, new: str, diffs: list[FileDiff]) -> str:
    """A summary table, then each file's diff in a collapsible block (open by default)."""
    if not diffs:
        return f"`{old}` and `{new}` are identical.\n"
    out = [f"Generated from the code when this site was built: "
           f"`python tools/stage_diff.py {old} {new}` prints the same diff.", "",
           "| file | change | lines |", "|---|---|---|"]
    for d in diffs:
        out.append(f"| `{d.path}` | {d.status} | +{d.added} −{d.removed} |")
    out.append("")
    for d in diffs:
        body = "\n".join(d.lines)
        fence = _fence(body)
        out.append(f'???+ note "`{d.path}` ({d.status}, +{d.added} −{d.removed})"')
        out.append("")
        out.append(f"    {fence}diff")
        out.extend(f"    {line}" if line else "" for line in d.lines)
        out.append(f"    {fence}")
        out.append("")
    return "\n".join(out)


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
    group.add_argument("--markdown", action="store_true", help="the Markdown the docs show")
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
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.stat:
        sys.stdout.write(format_stat(args.old, args.new, diffs))
    elif args.markdown:
        sys.stdout.write(format_markdown(args.old, args.new, diffs))
    else:
        sys.stdout.write(format_unified(diffs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
