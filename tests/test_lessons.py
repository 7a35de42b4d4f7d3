"""Each stage's LESSON names exactly the files its idea changes from the stage before.

A `LESSON` file sits in every stage folder: a first `# ` line saying the idea, then one
path per line (relative to the stage folder), `#` comments allowed, also after a path.
The first stage (m0_init) lists no files: nothing comes before it.

For each pair of neighbouring stages present (bench/stages.py), the files that differ
(modified, added or removed; as `tools/stage_diff.py` and the docs see them, so without
`__pycache__` and LESSON itself) must be exactly the later stage's LESSON:

- a file that differs but is not listed is a change outside the idea: either a fix that
  was not carried to the earlier stage (carry it), or the idea needs it (list it);
- a file listed that does not differ is a stale manifest (remove it).
"""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tools"))
sys.path.insert(0, str(REPO_ROOT))
import stage_diff  # noqa: E402  (tools/stage_diff.py)
from bench.stages import present_stages  # noqa: E402

STAGES = [s.package for s in present_stages()]
PAIRS = list(zip(STAGES, STAGES[1:]))


def read_lesson(stage: str) -> tuple[str, list[str]]:
    """(the first line, the listed paths) of a stage's LESSON."""
    lines = (REPO_ROOT / stage / "LESSON").read_text(encoding="utf-8").splitlines()
    paths = [line.split("#", 1)[0].strip() for line in lines]
    return (lines[0] if lines else ""), [p for p in paths if p]


@pytest.mark.parametrize("stage", STAGES)
def test_lesson_is_well_formed(stage):
    assert (REPO_ROOT / stage / "LESSON").is_file(), f"{stage}/LESSON is missing"
    first, paths = read_lesson(stage)
    assert first.startswith("# ") and len(first) > 2, \
        f"{stage}/LESSON: the first line must be a `# ` comment saying the stage's idea"
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    assert not duplicates, f"{stage}/LESSON lists these twice: {duplicates}"
    bad = [p for p in paths if p.startswith("/") or ".." in p.split("/") or "\\" in p]
    assert not bad, f"{stage}/LESSON: paths must be relative to {stage}/ with '/': {bad}"
    if stage == STAGES[0]:
        assert not paths, (f"{stage}/LESSON: the first stage has no stage before it, so it "
                           f"lists no files; remove {paths}")


@pytest.mark.parametrize("old, new", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_neighbouring_stages_differ_only_in_lesson_files(old, new):
    changed = {d.path: f"{d.status}, +{d.added} -{d.removed}"
               for d in stage_diff.stage_diff(old, new)}
    listed = set(read_lesson(new)[1])
    unlisted = sorted(set(changed) - listed)
    stale = sorted(listed - set(changed))
    message = [f"{old} -> {new}: {new}/LESSON does not match the diff "
               f"(see `python tools/stage_diff.py --stat {old} {new}`)."]
    if unlisted:
        message.append(f"These files differ but {new}/LESSON does not list them. If the "
                       f"change belongs to the idea of {new}, add the lines; if it is a fix "
                       f"or cleanup, carry it to {old} (and every stage that has the file):")
        message += [f"    {path}    # {changed[path]}" for path in unlisted]
    if stale:
        message.append(f"These lines of {new}/LESSON name files that are the same in both "
                       f"stages (or in neither); remove them:")
        message += [f"    {path}" for path in stale]
    assert not unlisted and not stale, "\n".join(message)
