"""Each stage's LESSON names exactly the files its idea changes from the stage before.

A `LESSON` file sits in every stage folder: a first `# ` line saying the idea, then the
changed files, one path per line (relative to the stage folder), each followed by a `#`
comment saying why it changed. The paths sit in two sections, each opened by its line:

    ## the idea     the files that carry the idea, in the order to read them
    ## around it    the files that follow from it (docstrings, config, demo, packages)

Other `#` lines are comments. The docs page of a stage shows the idea's files first, then
the others, each closed until opened and with its why (`tools/stage_diff.py`, which also
holds the parser, `read_lesson`). The first stage (m0_init) lists no files: nothing comes
before it. Every later stage has at least one file under `## the idea`.

For each pair of neighbouring stages present (bench/stages.py), the files that differ
(modified, added or removed; as `tools/stage_diff.py` and the docs see them, so without
`__pycache__` and LESSON itself) must be exactly the later stage's LESSON:

- a file that differs but is not listed is a change outside the idea: either a fix that
  was not carried to the earlier stage (carry it), or the idea needs it (list it);
- a file listed that does not differ is a stale manifest (remove it).
"""

import shutil
import subprocess
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


@pytest.mark.parametrize("stage", STAGES)
def test_lesson_is_well_formed(stage):
    assert (REPO_ROOT / stage / "LESSON").is_file(), f"{stage}/LESSON is missing"
    lesson = stage_diff.read_lesson(stage)  # raises on a bad first line or section
    paths = [e.path for e in lesson.entries]
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    assert not duplicates, f"{stage}/LESSON lists these twice: {duplicates}"
    bad = [p for p in paths if p.startswith("/") or ".." in p.split("/") or "\\" in p]
    assert not bad, f"{stage}/LESSON: paths must be relative to {stage}/ with '/': {bad}"
    no_why = [e.path for e in lesson.entries if not e.why]
    assert not no_why, f"{stage}/LESSON: say why each file changed, in a `#` comment: {no_why}"
    if stage == STAGES[0]:
        assert not paths, (f"{stage}/LESSON: the first stage has no stage before it, so it "
                           f"lists no files; remove {paths}")
    else:
        assert any(e.key for e in lesson.entries), \
            f"{stage}/LESSON: list the files that carry the idea under `## the idea`"


def test_lesson_parser_sorts_files_into_sections():
    text = ("# M9 · demo: an idea\n# a comment\n## the idea\na.py  # why a\n\n"
            "## around it\nb/c.py # why c, with a # inside\nd.py\n")
    lesson = stage_diff.parse_lesson(text)
    assert lesson.title == "M9 · demo: an idea"
    assert [(e.path, e.why, e.key) for e in lesson.entries] == [
        ("a.py", "why a", True), ("b/c.py", "why c, with a # inside", False), ("d.py", "", False)]
    for bad in ("no title\n", "# t\nx.py  # before any section\n", "# t\n## the ideas\n"):
        with pytest.raises(ValueError):
            stage_diff.parse_lesson(bad)


@pytest.mark.parametrize("old, new", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_neighbouring_stages_differ_only_in_lesson_files(old, new):
    changed = {d.path: f"{d.status}, +{d.added} -{d.removed}"
               for d in stage_diff.stage_diff(old, new)}
    listed = {e.path for e in stage_diff.read_lesson(new).entries}
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


# M5's idea is scheduling only: the worker, attention and kernels are M4's, unchanged.
SCHEDULING_ONLY = ("m4_flash_attn", "m5_chunked_prefill")
SCHEDULING_FILES = ("core/", "engine/", "config.py", "run.py", "__init__.py")
MAX_SCHEDULING_DIFF_LINES = 450


@pytest.mark.skipif(not all(s in STAGES for s in SCHEDULING_ONLY), reason="needs M4 and M5")
def test_chunked_prefill_changes_only_scheduling_files():
    old, new = SCHEDULING_ONLY
    changed = [d.path for d in stage_diff.stage_diff(old, new)]
    worker_side = [p for p in changed if p.split("/")[0] in ("worker", "attention", "ops")]
    assert not worker_side, (f"{old} -> {new} changes {worker_side}: chunked prefill is a "
                             f"scheduling change; the worker's form belongs in {old} too")
    outside = [p for p in changed if not p.startswith(SCHEDULING_FILES)]
    assert not outside, f"{old} -> {new} changes files beyond scheduling: {outside}"


@pytest.mark.skipif(not all(s in STAGES for s in SCHEDULING_ONLY), reason="needs M4 and M5")
@pytest.mark.skipif(shutil.which("diff") is None, reason="needs diff")
def test_chunked_prefill_diff_stays_small():
    old, new = SCHEDULING_ONLY
    result = subprocess.run(["diff", "-r", "-x", "__pycache__", old, new], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    num_lines = len(result.stdout.splitlines())
    assert 0 < num_lines <= MAX_SCHEDULING_DIFF_LINES, \
        f"`diff -r {old} {new}` is {num_lines} lines (at most {MAX_SCHEDULING_DIFF_LINES})"
