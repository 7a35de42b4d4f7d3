"""The boundaries inside a stage, checked on its source: who may import whom.

- The worker never imports the scheduler's side (`core/`): it gets plain ints.
- The scheduler's side never touches tensors (no torch import).
- `LLM` talks to the engine only: no reaching into the model runner or the scheduler.
- A helper is defined once per stage (`cdiv`).
- Every file opens with a short docstring (DESIGN.md's conventions): at most 12 lines.
"""

import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT, STAGES, stages_with


def python_files(stage: str, folder: str = "") -> list[Path]:
    return sorted((Path(REPO_ROOT) / stage / folder).rglob("*.py"))


def imported_modules(path: Path) -> list[str]:
    """Every module a file imports, relative ones with their leading dots."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("stage", stages_with("batching"))
def test_the_worker_never_imports_core(stage):
    for path in python_files(stage, "worker"):
        bad = [m for m in imported_modules(path) if m.lstrip(".").startswith("core")
               or m.startswith(f"{stage}.core")]
        assert not bad, f"{path.relative_to(REPO_ROOT)} imports {bad}"


@pytest.mark.parametrize("stage", stages_with("batching"))
def test_core_never_touches_tensors(stage):
    for path in python_files(stage, "core"):
        bad = [m for m in imported_modules(path) if m.split(".")[0] == "torch"]
        assert not bad, f"{path.relative_to(REPO_ROOT)} imports torch"


@pytest.mark.parametrize("stage", stages_with("generate"))
def test_llm_talks_to_the_engine_only(stage):
    path = Path(REPO_ROOT) / stage / "llm.py"
    attributes = {node.attr for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, ast.Attribute)}
    assert not attributes & {"model_runner", "scheduler", "kv_cache_manager", "model"}


@pytest.mark.parametrize("stage", list(STAGES))
def test_cdiv_is_defined_once(stage):
    definitions = [path for path in python_files(stage)
                   for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.FunctionDef) and node.name == "cdiv"]
    assert len(definitions) <= 1, definitions


def _repo_top_level_names() -> set[str]:
    root = Path(REPO_ROOT)
    return ({p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
            | {p.stem for p in root.glob("*.py")})


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_imports_nothing_of_this_repository_outside_itself(stage):
    """Copying a stage's folder gives a working engine: inside it, imports are relative
    or of installed packages, never of another stage, the bench or the tools (nor of the
    stage itself by its absolute name)."""
    ours = _repo_top_level_names()
    assert {"bench", "tools", "tests", stage} <= ours
    for path in python_files(stage):
        bad = [m for m in imported_modules(path)
               if not m.startswith(".") and m.split(".")[0] in ours]
        assert not bad, f"{path.relative_to(REPO_ROOT)} imports {bad}"


MAX_MODULE_DOCSTRING_LINES = 12


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_module_docstring_is_short(stage):
    """A module docstring says what the file is for today, and in one line which stage
    introduced it and which changed it; the story of each change is on that stage's docs
    page (docs/mN_*.md, "How the files changed"), beside the generated diff. So no
    module docstring is longer than 12 lines, and none is missing."""
    offenders = []
    for path in python_files(stage):
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
        lines = len(doc.splitlines()) if doc else 0
        if not doc or lines > MAX_MODULE_DOCSTRING_LINES:
            offenders.append(f"{path.relative_to(REPO_ROOT)}: "
                             + (f"{lines} lines" if doc else "no docstring"))
    assert not offenders, (
        f"module docstrings must be 1 to {MAX_MODULE_DOCSTRING_LINES} lines (what the file "
        f"does today, then 'Introduced in Mk; changed in ...'); move the history to the "
        f"stage's docs page:\n" + "\n".join(offenders))
