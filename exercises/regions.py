"""Exercise regions: the code between a `# exercise mN.K begin` / `# exercise mN.K end`
comment pair in a stage's file.

`blank` swaps each region's body for a hint and a `raise NotImplementedError` (the
markers stay, so the learner's body can be found again); `bodies` reads the bodies back
out; `splice` puts given bodies into a file's regions. The docs and the stage diff drop
the marker lines (`is_marker`), so the reference code reads as if they were not there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MARKER = re.compile(r"^(?P<indent>\s*)# exercise (?P<id>m\d+\.\d+) (?P<end>begin|end)\s*$")


def is_marker(line: str) -> bool:
    return MARKER.match(line) is not None


@dataclass
class Region:
    exercise_id: str
    indent: str  # the begin marker's: the body's and the stub's
    begin: int  # line index of the begin marker
    end: int  # line index of the end marker


def find_regions(text: str, where: str = "<text>") -> list[Region]:
    """Every region of a file, in order; a marker without its pair is an error."""
    regions, open_region = [], None
    for number, line in enumerate(text.splitlines()):
        match = MARKER.match(line)
        if not match:
            continue
        exercise_id, is_end = match["id"], match["end"] == "end"
        if not is_end:
            if open_region is not None:
                raise ValueError(f"{where}:{number + 1}: exercise {exercise_id} begins inside "
                                 f"exercise {open_region.exercise_id}")
            open_region = Region(exercise_id, match["indent"], number, -1)
        elif open_region is None or open_region.exercise_id != exercise_id:
            raise ValueError(f"{where}:{number + 1}: exercise {exercise_id} ends but never began")
        else:
            open_region.end = number
            regions.append(open_region)
            open_region = None
    if open_region is not None:
        raise ValueError(f"{where}: exercise {open_region.exercise_id} begins on line "
                         f"{open_region.begin + 1} and never ends (its end marker is missing)")
    return regions


def bodies(text: str, exercise_id: str, where: str = "<text>") -> list[str]:
    """The bodies of one exercise's regions in a file, in order (the lines between the
    markers, each ending in a newline)."""
    lines = text.splitlines(keepends=True)
    return ["".join(lines[r.begin + 1:r.end]) for r in find_regions(text, where)
            if r.exercise_id == exercise_id]


def splice(text: str, exercise_id: str, new_bodies: list[str], where: str = "<text>") -> str:
    """`text` with the bodies of `exercise_id`'s regions replaced, in order."""
    regions = [r for r in find_regions(text, where) if r.exercise_id == exercise_id]
    if len(regions) != len(new_bodies):
        raise ValueError(f"{where}: exercise {exercise_id} has {len(regions)} regions here, "
                         f"but {len(new_bodies)} bodies were given (are its markers intact?)")
    lines = text.splitlines(keepends=True)
    for region, body in reversed(list(zip(regions, new_bodies))):
        lines[region.begin + 1:region.end] = [body] if body else []
    return "".join(lines)


def stub(exercise_id: str, title: str, hint: str, indent: str) -> str:
    """What a blanked region holds: the hint as comments, then the raise."""
    hint_lines = [f"{indent}# TODO exercise {exercise_id}: {title}\n"]
    hint_lines += [f"{indent}# {line}\n" if line else f"{indent}#\n"
                   for line in hint.strip().splitlines()]
    message = f"exercise {exercise_id}: {title}".replace("\\", "\\\\").replace('"', '\\"')
    return "".join(hint_lines) + f'{indent}raise NotImplementedError("{message}")\n'


def blank(text: str, exercise_id: str, title: str, hint: str, where: str = "<text>") -> str:
    """`text` with every region of `exercise_id` replaced by its stub."""
    regions = [r for r in find_regions(text, where) if r.exercise_id == exercise_id]
    return splice(text, exercise_id, [stub(exercise_id, title, hint, r.indent) for r in regions],
                  where)
