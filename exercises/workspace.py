"""The learner's copy of a stage: made with its exercises blanked, read back for checks.

`start` copies a stage to `workspace/<package>/` (gitignored) and blanks each exercise's
regions; the reference stage is never written. `overlay` builds what a check imports:
the reference stage, renamed, with one exercise's regions taken from the workspace, so
each check sees only its own exercise's code and a check passes when that code works.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bench import stages

from . import regions
from .catalog import REPO, Exercise, stage_exercises

DEFAULT_WORKSPACE = REPO / "workspace"
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")


def workspace_dir() -> Path:
    return Path(os.environ.get("FOLOVLLM_WORKSPACE", DEFAULT_WORKSPACE)).resolve()


def stage_package(short: str) -> str:
    return stages.get(short).package


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def region_files(short: str, root: Path) -> dict[str, list[Path]]:
    """exercise id -> the files under `root`'s copy of the stage that hold its regions."""
    found: dict[str, list[Path]] = {}
    for path in python_files(root / stage_package(short)):
        for region in regions.find_regions(path.read_text(encoding="utf-8"), str(path)):
            if path not in found.setdefault(region.exercise_id, []):
                found[region.exercise_id].append(path)
    return found


def check_markers(short: str) -> None:
    """Every exercise of the stage has regions in the reference, and every region there
    belongs to one of the stage's exercises."""
    known = {ex.id for ex in stage_exercises(short)}
    found = region_files(short, REPO)
    if set(found) != known:
        raise ValueError(f"{stage_package(short)}: regions for {sorted(set(found) - known)} "
                         f"have no exercise; exercises {sorted(known - set(found))} have no region")


def start(short: str, workspace: Path, force: bool = False) -> Path:
    """Copy the stage into the workspace with its exercises blanked; returns the copy."""
    check_markers(short)
    dest = workspace / stage_package(short)
    if dest.exists():
        if not force:
            raise FileExistsError(f"{dest} exists: your work on {short} is there. "
                                  f"`start {short} --force` starts it over (that work is lost)")
        shutil.rmtree(dest)
    workspace.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / stage_package(short), dest, ignore=_IGNORE)
    for ex in stage_exercises(short):
        for path in region_files(short, workspace)[ex.id]:
            text = path.read_text(encoding="utf-8")
            path.write_text(regions.blank(text, ex.id, ex.title, ex.hint, str(path)),
                            encoding="utf-8")
    return dest


def learner_bodies(ex: Exercise, workspace: Path) -> dict[str, list[str]]:
    """file (relative to the stage) -> the bodies of the exercise's regions in the
    workspace copy; raises with what to do if the copy or its markers are missing."""
    package = stage_package(ex.stage_short)
    copy = workspace / package
    if not copy.is_dir():
        raise FileNotFoundError(f"no workspace copy of {package} in {workspace}: "
                                f"run `python -m exercises start {ex.stage_short}` first")
    out = {}
    for path in region_files(ex.stage_short, REPO)[ex.id]:
        rel = path.relative_to(REPO / package)
        mine = copy / rel
        if not mine.is_file():
            raise FileNotFoundError(f"{mine} is missing (exercise {ex.id} is written there)")
        out[rel.as_posix()] = regions.bodies(mine.read_text(encoding="utf-8"), ex.id, str(mine))
    return out


def overlay(ex: Exercise, workspace: Path, dest: Path) -> str:
    """Under `dest`, the reference stage with `ex`'s regions from the workspace, as a
    package of its own name; returns that name."""
    package = stage_package(ex.stage_short)
    name = f"{package}__{ex.id.replace('.', '_')}"
    shutil.copytree(REPO / package, dest / name, ignore=_IGNORE)
    for rel, bodies in learner_bodies(ex, workspace).items():
        path = dest / name / rel
        text = path.read_text(encoding="utf-8")
        path.write_text(regions.splice(text, ex.id, bodies, str(path)), encoding="utf-8")
    return name


def reference_bodies(ex: Exercise) -> dict[str, list[tuple[int, str]]]:
    """file -> (first line number, body) of each of the exercise's reference regions."""
    package = stage_package(ex.stage_short)
    out: dict[str, list[tuple[int, str]]] = {}
    for path in region_files(ex.stage_short, REPO)[ex.id]:
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        rel = path.relative_to(REPO / package).as_posix()
        out[rel] = [(r.begin + 2, "".join(lines[r.begin + 1:r.end]))
                    for r in regions.find_regions(text, str(path)) if r.exercise_id == ex.id]
    return out


def restore(ex: Exercise, workspace: Path) -> None:
    """Put the reference bodies back into the workspace copy (what `solution --apply` does)."""
    package = stage_package(ex.stage_short)
    for rel, found in reference_bodies(ex).items():
        path = workspace / package / rel
        text = path.read_text(encoding="utf-8")
        path.write_text(regions.splice(text, ex.id, [body for _, body in found], str(path)),
                        encoding="utf-8")
