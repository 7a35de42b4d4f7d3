"""`python -m exercises`: list, start, check and see the solution of the exercises.

    python -m exercises list [m3]          every exercise: id, title, what to write, check
    python -m exercises start m3           copy m3 to workspace/m3_paged_kv/, exercises blanked
    python -m exercises check m3.2         run m3.2's tests on your copy (`check m3`: all of m3)
    python -m exercises solution m3.2      show the reference code (asks first)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import catalog, check, workspace

EPILOG = ("Your code goes between the `# exercise mN.K begin` and `end` comments of the copy "
          "in the workspace (default: workspace/ in the repository, or $FOLOVLLM_WORKSPACE); "
          "the reference stages are never written.")


def cmd_list(args) -> int:
    exercises = catalog.find(args.name)
    stage = None
    for ex in exercises:
        if ex.stage_short != stage:
            stage = ex.stage_short
            print(f"{stage.upper()} ({workspace.stage_package(stage)}): "
                  f"python -m exercises start {stage}")
        print(f"  {ex.id:5} {ex.title} ({ex.difficulty})")
        print(f"        write: {', '.join(ex.writes)}")
        print(f"        check: {ex.check_command}")
    print(f"{len(exercises)} exercises.")
    return 0


def cmd_start(args) -> int:
    short = args.stage
    exercises = catalog.find(short)
    if "." in short:
        raise LookupError(f"start takes a stage (e.g. {short.split('.')[0]}), not one exercise")
    dest = workspace.start(short, args.workspace, force=args.force)
    print(f"{dest}: a copy of {workspace.stage_package(short)} with "
          f"{len(exercises)} exercises blanked:")
    for ex in exercises:
        print(f"  {ex.id:6} {ex.title} ({ex.difficulty}): {', '.join(ex.writes)}")
    print(f"Write each one between its `# exercise {short}.K begin` and `end` comments, then "
          f"`python -m exercises check {short}.1` (or `check {short}` for all).")
    return 0


def cmd_check(args) -> int:
    exercises = catalog.find(args.name)
    where = "the reference" if args.reference else str(args.workspace)
    print(f"checking {len(exercises)} exercise{'s' if len(exercises) != 1 else ''} "
          f"on {where} ...", flush=True)
    started = time.perf_counter()
    results = check.run_checks(exercises, None if args.reference else args.workspace)
    for result in results:
        print(check.format_result(result, verbose=args.verbose))
    passed = sum(result.ok for result in results)
    print(f"{passed} of {len(results)} passed in {time.perf_counter() - started:.0f} s")
    return 0 if passed == len(results) else 1


def cmd_solution(args) -> int:
    [ex] = catalog.find(args.exercise) if "." in args.exercise else [None]
    if ex is None:
        raise LookupError(f"solution takes one exercise (e.g. {args.exercise}.1)")
    if not args.yes:
        if not sys.stdin.isatty():
            raise PermissionError("solution asks before it shows the answer: pass --yes")
        answer = input(f"Show the reference code of {ex.id} ({ex.title})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Not shown.")
            return 1
    package = workspace.stage_package(ex.stage_short)
    for rel, found in workspace.reference_bodies(ex).items():
        for line, body in found:
            print(f"# {package}/{rel}, from line {line}:")
            print(body, end="")
    if args.apply:
        workspace.restore(ex, args.workspace)
        print(f"(written into {args.workspace / package})")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exercises", description=__doc__.split("\n")[0],
                                epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    add = sub.add_parser
    s = add("list", help="every exercise: id, title, difficulty, what to write, the check")
    s.add_argument("name", nargs="?", default="all", help="a stage (m3) or all (the default)")
    s.set_defaults(run=cmd_list)
    s = add("start", help="copy a stage into the workspace with its exercises blanked")
    s.add_argument("stage", help="a stage with exercises, e.g. m3")
    s.add_argument("--force", action="store_true", help="start over: your copy is replaced")
    s.set_defaults(run=cmd_start)
    s = add("check", help="run an exercise's tests (or a stage's, or all) on your copy")
    s.add_argument("name", help="an exercise (m3.2), a stage (m3) or all")
    s.add_argument("--reference", action="store_true",
                   help="check the reference stage instead of your copy")
    s.add_argument("-v", "--verbose", action="store_true", help="whole tracebacks")
    s.set_defaults(run=cmd_check)
    s = add("solution", help="show an exercise's reference code (asks first)")
    s.add_argument("exercise", help="an exercise id, e.g. m3.2")
    s.add_argument("--yes", action="store_true", help="do not ask first")
    s.add_argument("--apply", action="store_true",
                   help="also write it into your copy (that exercise is then solved)")
    s.set_defaults(run=cmd_solution)
    for s in sub.choices.values():
        s.add_argument("--workspace", type=Path, default=workspace.workspace_dir(),
                       help="where the copies live (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (LookupError, FileExistsError, FileNotFoundError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
