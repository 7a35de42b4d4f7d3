"""The exercises: each one's id, stage, title, the code to write, difficulty, why it
matters and a hint. Each stage's list is in `exercises/stages/mN.py`; its checks are the
tests in `exercises/checks/test_mN.py`, marked `@pytest.mark.exercise("mN.K")`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIFFICULTIES = ("easy", "medium", "hard")


@dataclass(frozen=True)
class Exercise:
    id: str  # "m3.2": the stage's short name, then its number
    title: str  # what to build, in a few words
    writes: tuple[str, ...]  # "file.py::function": where the regions are, in the stage
    difficulty: str  # easy | medium | hard
    why: str  # why it matters: the stage's idea it holds (the docs show it)
    hint: str  # shown in the blanked code and when its check fails

    @property
    def stage_short(self) -> str:
        return self.id.split(".")[0]

    @property
    def number(self) -> int:
        return int(self.id.split(".")[1])

    @property
    def files(self) -> list[str]:
        """The stage files that hold its regions."""
        return sorted({w.split("::")[0] for w in self.writes})

    @property
    def check_command(self) -> str:
        return f"python -m exercises check {self.id}"


def stage_shorts() -> list[str]:
    """The stages that have exercises, in order ("m1", ...)."""
    return sorted(p.stem for p in (REPO / "exercises" / "stages").glob("m*.py"))


def stage_exercises(short: str) -> list[Exercise]:
    module = importlib.import_module(f"exercises.stages.{short}")
    exercises = list(module.EXERCISES)
    for number, ex in enumerate(exercises, start=1):
        if ex.id != f"{short}.{number}" or ex.difficulty not in DIFFICULTIES:
            raise ValueError(f"exercises/stages/{short}.py: {ex.id} is out of order, or its "
                             f"difficulty {ex.difficulty!r} is not one of {DIFFICULTIES}")
    return exercises


def all_exercises() -> list[Exercise]:
    return [ex for short in stage_shorts() for ex in stage_exercises(short)]


def find(name: str) -> list[Exercise]:
    """The exercises `name` means: one id ("m3.2"), a stage ("m3"), or "all"."""
    if name == "all":
        return all_exercises()
    short = name.split(".")[0]
    if short not in stage_shorts():
        raise LookupError(f"no exercises for {name!r}: the stages with exercises are "
                          f"{', '.join(stage_shorts())}")
    exercises = stage_exercises(short)
    if "." not in name:
        return exercises
    chosen = [ex for ex in exercises if ex.id == name]
    if not chosen:
        raise LookupError(f"no exercise {name!r}: {short}'s are "
                          f"{', '.join(ex.id for ex in exercises)}")
    return chosen
