"""The exercises (`python -m exercises`): every one fails on the blanked copy with its own
NotImplementedError, passes once its reference code is copied back (and only it), and
the reference passes them all; the catalog, the markers and the CLI."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.stages import ALL_STAGES
from exercises import catalog, check, regions, workspace

REPO_ROOT = Path(__file__).resolve().parents[1]
SHORTS = [s.short for s in ALL_STAGES if s.short != "m0"]


def cli(*args, workspace_dir=None, stdin=None):
    env = dict(os.environ)
    if workspace_dir is not None:
        env["FOLOVLLM_WORKSPACE"] = str(workspace_dir)
    return subprocess.run([sys.executable, "-m", "exercises", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300, input=stdin)


# -- the catalog and the markers ------------------------------------------------------
def test_every_stage_from_m1_has_at_least_three_exercises():
    assert catalog.stage_shorts() == SHORTS
    for short in SHORTS:
        exercises = catalog.stage_exercises(short)
        assert len(exercises) >= 3, short
        for ex in exercises:
            assert len(ex.title) <= 56 and ex.why and ex.hint and ex.writes, ex.id
            assert all(len(line) <= 88 for line in ex.hint.splitlines()), ex.id
    assert len(catalog.all_exercises()) >= 21


@pytest.mark.parametrize("short", SHORTS)
def test_each_exercise_has_its_regions_in_its_own_stage_only(short):
    workspace.check_markers(short)  # every exercise has regions, every region an exercise
    for other in ALL_STAGES:
        for path in workspace.python_files(other.path):
            for region in regions.find_regions(path.read_text(encoding="utf-8"), str(path)):
                assert region.exercise_id.split(".")[0] == other.short, (
                    f"{path}: a region of {region.exercise_id} outside its stage")
    for ex in catalog.stage_exercises(short):
        stage_dir = REPO_ROOT / workspace.stage_package(short)
        found = {p.relative_to(stage_dir).as_posix()
                 for p in workspace.region_files(short, REPO_ROOT)[ex.id]}
        assert found == set(ex.files), f"{ex.id}: writes names {ex.files}, regions are in {found}"


def test_regions_blank_and_splice_back():
    text = ("def f(x):\n    '''doc'''\n    # exercise m9.1 begin\n    y = x + 1\n"
            "    return y\n    # exercise m9.1 end\n")
    blanked = regions.blank(text, "m9.1", 'add "one"', "Return x + 1.")
    assert "raise NotImplementedError(\"exercise m9.1: add \\\"one\\\"\")" in blanked
    assert "    # Return x + 1.\n" in blanked and "y = x + 1" not in blanked
    scope: dict = {}
    exec(blanked, scope)
    with pytest.raises(NotImplementedError, match="exercise m9.1: add"):
        scope["f"](1)
    assert regions.splice(blanked, "m9.1", regions.bodies(text, "m9.1")) == text
    with pytest.raises(ValueError, match="never ends"):
        regions.find_regions("# exercise m9.1 begin\nx = 1\n")
    with pytest.raises(ValueError, match="never began"):
        regions.find_regions("x = 1\n# exercise m9.1 end\n")
    with pytest.raises(ValueError, match="2 bodies were given"):
        regions.splice(text, "m9.1", ["a\n", "b\n"])


def test_the_stage_diff_and_docs_leave_the_markers_out():
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import stage_diff
    diff = "\n".join(line for d in stage_diff.stage_diff("m2_batching", "m3_paged_kv")
                     for line in d.lines)
    assert "block_pool.py" in diff and "# exercise m3." not in diff
    # m4 has no M3 markers and no diff line says they went
    assert "# exercise" not in "\n".join(
        line for d in stage_diff.stage_diff("m3_paged_kv", "m4_flash_attn") for line in d.lines)


# -- the acceptance: blank fails, copied back passes, only what was copied ---------------
def copy_back(ex, ws: Path) -> None:
    """What a learner does by hand: paste the reference body between the markers."""
    package = workspace.stage_package(ex.stage_short)
    for rel in ex.files:
        reference = (REPO_ROOT / package / rel).read_text(encoding="utf-8")
        mine = ws / package / rel
        mine.write_text(regions.splice(mine.read_text(encoding="utf-8"), ex.id,
                                       regions.bodies(reference, ex.id)), encoding="utf-8")


def test_blank_fails_with_its_own_error_then_each_copied_back_passes_alone(tmp_path):
    ws = tmp_path / "workspace"
    everything = catalog.all_exercises()
    for short in SHORTS:
        workspace.start(short, ws)
    # 1. Blanked: every check fails, and only with its own region's NotImplementedError.
    for result in check.run_checks(everything, ws):
        assert result.not_written and result.failed and not result.passed, (
            result.exercise.id, list(result.failed.items())[:1])
    # 2. Every other exercise copied back: those pass, the rest still fail as not written.
    solved = {ex.id for ex in everything if ex.number % 2 == 1}
    for ex in everything:
        if ex.id in solved:
            copy_back(ex, ws)
    for result in check.run_checks(everything, ws):
        if result.exercise.id in solved:
            assert result.ok, (result.exercise.id, list(result.failed.items())[:1])
        else:
            assert result.not_written and not result.passed, result.exercise.id
    # 3. The rest copied back: all pass, and the copies are the reference again.
    for ex in everything:
        if ex.id not in solved:
            copy_back(ex, ws)
    for short in SHORTS:
        package = workspace.stage_package(short)
        for path in workspace.python_files(REPO_ROOT / package):
            rel = path.relative_to(REPO_ROOT / package)
            assert (ws / package / rel).read_text() == path.read_text(), rel
    results = check.run_checks(everything, ws)
    assert [r.exercise.id for r in results if not r.ok] == []


# -- the CLI --------------------------------------------------------------------------
def test_cli_help_and_list():
    for command in ([], ["list"], ["start"], ["check"], ["solution"]):
        result = cli(*command, "--help")
        assert result.returncode == 0 and "usage: python -m exercises" in result.stdout
    result = cli("list")
    assert result.returncode == 0
    for ex in catalog.all_exercises():
        assert ex.id in result.stdout and ex.check_command in result.stdout
    assert cli("list", "m3").stdout.count("python -m exercises check m3.") == len(
        catalog.stage_exercises("m3"))


def test_cli_start_check_solution(tmp_path):
    ws = tmp_path / "ws"
    assert "no workspace copy of m3_paged_kv" in cli("check", "m3.3", workspace_dir=ws).stderr
    started = cli("start", "m3", workspace_dir=ws)
    assert started.returncode == 0, started.stderr
    assert (ws / "m3_paged_kv" / "core" / "block_pool.py").is_file()
    again = cli("start", "m3", workspace_dir=ws)
    assert again.returncode == 2 and "--force" in again.stderr
    failed = cli("check", "m3.3", workspace_dir=ws)
    assert failed.returncode == 1 and "not written yet" in failed.stdout
    assert "hint:" in failed.stdout and "0 of 1 passed" in failed.stdout
    # a wrong body: the failing test and its assertion are shown
    path = ws / "m3_paged_kv" / "worker" / "input_batch.py"
    text = path.read_text()
    path.write_text(regions.splice(text, "m3.3", [
        "    return block_ids[position // block_size] * block_size\n"]))
    wrong = cli("check", "m3.3", workspace_dir=ws)
    assert wrong.returncode == 1 and " failed (" in wrong.stdout
    assert "test_slot_of_every_position" in wrong.stdout and "E   assert 28 ==" in wrong.stdout
    # code that does not even compile: the error names the learner's file, not a copy
    path.write_text(regions.splice(text, "m3.3", ["    return block_ids[position\n"]))
    broken = cli("check", "m3.3", workspace_dir=ws)
    assert broken.returncode == 1 and "SyntaxError" in broken.stdout
    assert f'File "{path}", line' in broken.stdout and "folovllm-check" not in broken.stdout
    refused = cli("solution", "m3.3", workspace_dir=ws, stdin="")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    shown = cli("solution", "m3.3", "--yes", "--apply", workspace_dir=ws)
    assert "position % block_size" in shown.stdout and shown.returncode == 0
    assert cli("check", "m3.3", workspace_dir=ws).returncode == 0
    assert (REPO_ROOT / "m3_paged_kv").is_dir() and not (REPO_ROOT / "workspace" / "x").exists()


@pytest.mark.parametrize("args, message", [
    (["check", "m9"], "no exercises for 'm9'"),
    (["check", "m3.99"], "no exercise 'm3.99'"),
    (["start", "m3.1"], "start takes a stage"),
    (["solution", "m3"], "solution takes one exercise"),
    (["start", "m0"], "no exercises for 'm0'"),
])
def test_cli_bad_names(tmp_path, args, message):
    result = cli(*args, workspace_dir=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
