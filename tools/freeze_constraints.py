"""Write constraints.txt: the package versions the suite last passed with.

    python tools/freeze_constraints.py            # from the running environment
    python tools/freeze_constraints.py --check    # exit 1 if constraints.txt differs

`make install` passes the file to pip (`-c constraints.txt`), so a fresh install gets
what CI tested. Run it in an environment where `make test` just passed, e.g. after
`make test-latest` (the newest releases) went green, and commit the file. torch and the
packages a torch build pins exactly (triton, nvidia-*) are left out: the Makefile installs
torch (with triton) only where none is installed, so a GPU user's CUDA build stays.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "constraints.txt"
LEFT_OUT = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|folovllm|pip|setuptools|wheel)$")
HEADER = """\
# The versions `make test` last passed with (tools/freeze_constraints.py wrote this file).
# `make install` installs with `pip install -c constraints.txt`; `make test-latest` tests
# the newest releases instead. torch and triton are not here: see the Makefile's TORCH.
"""


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def frozen() -> list[str]:
    pins = {}
    for dist in importlib.metadata.distributions():
        name = normalized(dist.metadata["Name"])
        if not LEFT_OUT.match(name):
            pins[name] = f"{name}=={dist.version}"
    return [pins[name] for name in sorted(pins)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="compare with constraints.txt instead of writing it (exit 1 if it "
                        "differs)")
    args = p.parse_args(argv)
    text = HEADER + "\n".join(frozen()) + "\n"
    if args.check:
        same = OUT.is_file() and OUT.read_text() == text
        print("constraints.txt matches this environment" if same else
              "constraints.txt differs from this environment", file=sys.stderr)
        return 0 if same else 1
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(REPO)} ({text.count('==')} packages)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
