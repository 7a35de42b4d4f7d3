"""`python -m exercises check`: run each exercise's tests on the learner's code.

Each exercise gets its own package (the reference stage with that exercise's regions
from the workspace, see `workspace.overlay`), and one pytest process runs the checks of
all the chosen exercises, each test on its exercise's package. A failure that is the
exercise's own `NotImplementedError` reads "not written yet".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .catalog import REPO, Exercise
from .workspace import overlay, stage_package

CHECKS = REPO / "exercises" / "checks"
SHOWN_FAILURES = 2  # failures shown in full (all with --verbose)


@dataclass
class Result:
    exercise: Exercise
    passed: list[str] = field(default_factory=list)  # test names
    failed: dict[str, str] = field(default_factory=dict)  # test name -> error text

    @property
    def ok(self) -> bool:
        return bool(self.passed) and not self.failed

    @property
    def not_written(self) -> bool:
        """Every failure is this exercise's own NotImplementedError."""
        return bool(self.failed) and all(is_own_stub(self.exercise, error)
                                         for error in self.failed.values())

    @property
    def status(self) -> str:
        return "passed" if self.ok else "not written yet" if self.not_written else "failed"


def is_own_stub(ex: Exercise, error: str) -> bool:
    """The error is the NotImplementedError that ex's blanked region raises (Triton's
    interpreter wraps it in an InterpreterError that names it)."""
    return "NotImplementedError" in error and f"exercise {ex.id}:" in error


def run_checks(exercises: list[Exercise], workspace: Path | None) -> list[Result]:
    """Check each exercise on the workspace copy (on the reference when workspace is None)."""
    with tempfile.TemporaryDirectory(prefix="folovllm-check-") as tmp:
        root = Path(tmp)
        packages = {ex.id: overlay(ex, workspace or REPO, root) for ex in exercises}
        report = root / "report.json"
        env = dict(os.environ, FOLOVLLM_EXERCISE_PACKAGES=json.dumps(packages),
                   FOLOVLLM_EXERCISE_REPORT=str(report), TRITON_INTERPRET="1",
                   PYTHONPATH=os.pathsep.join([str(root), str(REPO),
                                               os.environ.get("PYTHONPATH", "")]))
        files = sorted({str(CHECKS / f"test_{ex.stage_short}.py") for ex in exercises})
        cmd = [sys.executable, "-m", "pytest", "-q", "--tb=short", "-c", str(CHECKS / "pytest.ini"),
               "--rootdir", str(CHECKS), *files]
        timeout = 60 + 10 * len(exercises)  # a check takes seconds; a loop that never ends
        try:
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return [Result(ex, failed={"(all)": f"the checks took over {timeout} s: "
                                                "is there a loop that never ends?"})
                    for ex in exercises]
        outcomes = json.loads(report.read_text()) if report.is_file() else []
    # Errors name the files the learner wrote, not the built package they were copied to.
    where = {str(root / name): str((workspace or REPO) / stage_package(ex.stage_short))
             for ex, name in zip(exercises, packages.values())}
    for outcome in outcomes:
        for built, mine in where.items():
            outcome["error"] = outcome["error"].replace(built, mine)
    return collect(exercises, outcomes, proc.stdout + proc.stderr)


def collect(exercises: list[Exercise], outcomes: list[dict], log: str) -> list[Result]:
    results = {ex.id: Result(ex) for ex in exercises}
    for outcome in outcomes:
        result = results.get(outcome.get("exercise") or "")
        name = outcome["test"].split("::")[-1]
        if result is None:  # a collection error: every exercise of that file is affected
            for result in results.values():
                result.failed[outcome["test"]] = outcome["error"]
        elif outcome["outcome"] == "passed":
            result.passed.append(name)
        elif outcome["outcome"] == "failed":
            result.failed[name] = outcome["error"]
        else:
            result.failed[name] = f"{outcome['outcome']}: a check may not be skipped"
    for result in results.values():
        if not result.passed and not result.failed:
            result.failed["(no test ran)"] = log[-3000:]
    return list(results.values())


def format_result(result: Result, verbose: bool = False) -> str:
    ex = result.exercise
    total = len(result.passed) + len(result.failed)
    head = f"{ex.id:6} {ex.title:58} {result.status}"
    if result.ok:
        return f"{head} ({total} test{'s' if total != 1 else ''})"
    lines = [f"{head} ({len(result.failed)} of {total} failed)"]
    if result.not_written:
        lines.append(f"       the code between `# exercise {ex.id} begin` and `end` in "
                     f"{', '.join(ex.files)} still raises NotImplementedError")
    else:
        failures = list(result.failed.items())
        for name, error in failures if verbose else failures[:SHOWN_FAILURES]:
            shown = error.strip().splitlines()
            lines.append(f"       {name}:")
            lines.extend(f"         {line}" for line in (shown if verbose else shown[-10:]))
        if len(failures) > SHOWN_FAILURES and not verbose:
            lines.append(f"       ... and {len(failures) - SHOWN_FAILURES} more (-v shows all)")
    lines.extend(f"       hint: {line}" if i == 0 else f"             {line}"
                 for i, line in enumerate(ex.hint.strip().splitlines()))
    return "\n".join(lines)
