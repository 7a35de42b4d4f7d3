"""The boundaries inside a stage, checked on its source: who may import whom.

- The worker never imports the scheduler's side (`core/`): it gets plain ints.
- The scheduler's side never touches tensors (no torch import).
- `LLM` talks to the engine only: no reaching into the model runner or the scheduler.
- A `Sequence` is changed by `core/` only (M2 on): one owner per field.
- The engine imports neither torch nor `model_executor`: sampling state is the worker's.
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


def sequence_fields(stage: str) -> set[str]:
    """The fields of a `Sequence`."""
    tree = ast.parse((Path(REPO_ROOT) / stage / "request.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Sequence"]
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


def sequence_writes(path: Path, fields: set[str]) -> list[str]:
    """`x.field = ...`, `x.field += ...`, `x.field.append(...)`, `x.metrics.y = ...` on
    anything but `self`: the places a file changes a sequence."""
    mutators = {"append", "extend", "insert", "pop", "clear", "remove", "update"}
    found = []

    def owner_field(node) -> str | None:
        # the Sequence field an expression reaches into: x.field, x.field.y, x.field[i]
        while isinstance(node, (ast.Attribute, ast.Subscript)):
            inner = node.value
            if isinstance(node, ast.Attribute) and node.attr in fields and not (
                    isinstance(inner, ast.Name) and inner.id == "self"):
                return node.attr
            node = inner
        return None

    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Assign):
            targets = [t for target in node.targets
                       for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in mutators:
            targets = [node.func.value]
        for target in targets:
            name = owner_field(target)
            if name is not None:
                found.append(f"{path.name}:{node.lineno} .{name}")
    return found


@pytest.mark.parametrize("stage", stages_with("batching"))
def test_only_the_core_changes_a_sequence(stage):
    """The engine makes a sequence; from then on only `core/` writes its fields (the
    scheduler, its stop checker, the KV cache manager): one owner per piece of state."""
    fields = sequence_fields(stage)
    outside = [p for p in python_files(stage)
               if "core" not in p.relative_to(Path(REPO_ROOT) / stage).parts
               and p.name != "request.py"]
    writes = [w for path in outside for w in sequence_writes(path, fields)]
    assert not writes, f"outside core/: {writes}"


def test_the_sequence_write_check_sees_a_write():
    """The check above finds each kind of write (so an empty result means something)."""
    fields = {"status", "metrics", "token_ids"}
    source = ("seq.status = 1\nseq.metrics.finish_time = 2\nseq.token_ids.append(3)\n"
              "a, seq.status = 4, 5\nself.status = 6\nrow.other = 7\n")
    path = Path(REPO_ROOT) / "build" / "sequence_write_probe.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(source)
    try:
        assert sorted(w.split(" ")[1] for w in sequence_writes(path, fields)) == \
            [".metrics", ".status", ".status", ".token_ids"]
    finally:
        path.unlink()


@pytest.mark.parametrize("stage", stages_with("batching"))
def test_the_engine_leaves_sampling_state_to_the_worker(stage):
    for path in python_files(stage, "engine"):
        bad = [m for m in imported_modules(path)
               if m.split(".")[0] == "torch" or "model_executor.layers" in m]
        assert not bad, f"{path.relative_to(REPO_ROOT)} imports {bad}"


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
