"""Execute the notebooks top to bottom and save their outputs in place (`make notebooks`).

Docs tooling. The docs site shows the notebooks with their outputs (plots, tables,
timings), and those outputs are committed, so the site builds in seconds and offline.
This tool produces them: it runs every cell of each notebook on this machine, writes the
outputs into the `.ipynb`, and records where they came from in the notebook's metadata
under `folovllm`:

- `source_sha256`: a hash of the code and Markdown cells; tests/test_docs.py checks it
  against the cells, so a notebook edited without being run again fails the tests;
- `executed`: the date (UTC), the machine (CPU, cores), Python and torch versions, the
  git commit and whether the code (anything but the notebooks) had uncommitted changes,
  and the seconds the run took.

    python tools/run_notebooks.py                      # every notebook in notebooks/
    python tools/run_notebooks.py notebooks/m2_batching.ipynb
    python tools/run_notebooks.py --check              # only say which ones are stale

CI executes the notebooks again with nbmake (without writing), so they must keep passing
on a fresh machine; this tool is only about what the site shows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from bench.compare import cpu_name  # noqa: E402  (the bench names machines the same way)

NOTEBOOKS = REPO_ROOT / "notebooks"
TIMEOUT_S = 600  # per cell


def source_sha256(nb) -> str:
    """A hash of what the notebook says and runs: every cell's type and source."""
    cells = [[cell.cell_type, cell.source] for cell in nb.cells]
    return hashlib.sha256(json.dumps(cells).encode("utf-8")).hexdigest()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_commit() -> tuple[str | None, bool | None]:
    """HEAD, and whether files other than the notebooks differ from it (the code the
    notebooks ran; the notebooks themselves are pinned by `source_sha256`)."""
    head = _git("rev-parse", "--short", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!notebooks")
    return head, None if status is None else bool(status)


def _versions() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__}


def is_stale(path: Path) -> bool:
    """True when the notebook's cells changed since its outputs were saved (or never were)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return nb.metadata.get("folovllm", {}).get("source_sha256") != source_sha256(nb)


def execute(path: Path) -> float:
    """Run every cell of one notebook (kernel started in notebooks/) and save it in place."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - start
    commit, dirty = _git_commit()
    nb.metadata["folovllm"] = {
        "source_sha256": source_sha256(nb),
        "executed": {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                     "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                     "git_commit": commit, "code_dirty": dirty, "seconds": round(seconds, 1),
                     **_versions()},
        "how": "python tools/run_notebooks.py",
    }
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python tools/run_notebooks.py",
        description="Execute notebooks on this machine and save their outputs in place, "
                    "for the docs site.")
    p.add_argument("notebooks", nargs="*", type=Path,
                   help="notebooks to run (default: every notebooks/*.ipynb)")
    p.add_argument("--check", action="store_true",
                   help="run nothing; list the notebooks whose outputs are stale, exit 1 if any")
    args = p.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        print(f"error: no such notebook: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.check:
        stale = [path for path in paths if is_stale(path)]
        for path in stale:
            print(f"stale: {path} (run python tools/run_notebooks.py {path})")
        return 1 if stale else 0
    for n, path in enumerate(paths, 1):
        print(f"[{n}/{len(paths)}] {path.name} ...", end=" ", flush=True)
        print(f"{execute(path):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
