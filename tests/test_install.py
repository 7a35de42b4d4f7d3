"""What a newcomer's fresh install relies on: no module of ours hides an installed package.

`python bench/compare.py` puts `bench/` first on `sys.path` (so does every script in
`tools/`, and pytest puts `tests/` there), so a module in one of those folders that is
named like an importable package is imported *instead of* that package, by anyone: a
`bench/kernels.py` once broke transformers, which imports Hugging Face's `kernels`.
The repository root is on the path too (`python -m`, pytest), so its top-level names
count as well. Every such name is checked against the standard library, the top-level
names of every installed distribution, and a few that our dependencies import only
when present.
"""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, STAGES, stages_with

# Imported by transformers, torch or triton when installed, so possibly absent here.
OPTIONAL_IMPORTS = {"kernels", "flash_attn", "accelerate", "bitsandbytes", "optimum",
                    "gptqmodel", "auto_gptq", "vllm", "deepspeed", "peft", "xformers"}
# Folders whose modules sit first on sys.path when one of their files runs as a script.
SCRIPT_FOLDERS = ["bench", "tools", "tests", "notebooks", "serve", "exercises"]


def taken_names() -> set[str]:
    """Top-level import names of the installed distributions (this project's own aside),
    the standard library's, and OPTIONAL_IMPORTS."""
    owners: dict[str, set[str]] = {}
    for name, dists in importlib.metadata.packages_distributions().items():
        owners.setdefault(name, set()).update(dists)
    for dist in importlib.metadata.distributions():  # dists without top_level.txt
        dist_name = dist.metadata["Name"]
        for file in dist.files or []:
            first = file.parts[0] if file.parts else ""
            if first.endswith((".dist-info", ".data")) or first in ("..", "__pycache__"):
                continue
            if len(file.parts) > 1:
                owners.setdefault(first, set()).add(dist_name)
            elif first.endswith(".py"):
                owners.setdefault(first[:-3], set()).add(dist_name)
    installed = {name for name, dists in owners.items() if dists - {"folovllm"}}
    return installed | set(sys.stdlib_module_names) | OPTIONAL_IMPORTS


def our_module_names() -> dict[str, Path]:
    root = Path(REPO_ROOT)
    names = {}
    for folder in SCRIPT_FOLDERS:
        for path in sorted((root / folder).glob("*.py")):
            names.setdefault(path.stem, path)
        for path in sorted((root / folder).glob("*/__init__.py")):
            names.setdefault(path.parent.name, path.parent)
    for path in root.iterdir():  # the root's own packages and modules
        if path.is_dir() and (path / "__init__.py").is_file():
            names.setdefault(path.name, path)
        elif path.suffix == ".py":
            names.setdefault(path.stem, path)
    return names


def test_the_check_knows_the_package_that_once_was_shadowed():
    taken = taken_names()
    assert {"kernels", "json", "transformers", "torch", "triton"} <= taken
    assert "bench" not in taken and "m0_init" not in taken


def test_no_module_of_ours_shadows_an_installed_or_standard_package():
    taken = taken_names()
    clashes = {name: path.relative_to(REPO_ROOT).as_posix()
               for name, path in our_module_names().items()
               if name in taken and name not in ("conftest", "__init__")}
    assert not clashes, (f"these modules would hide the package of the same name when their "
                         f"folder is first on sys.path; rename them: {clashes}")


# -- the documented commands that no other test runs -------------------------------------
def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT)


@pytest.mark.parametrize("module", ["m7_gptq.quantize", "m7_gptq.eval_ppl"]
                         + [f"{stage}.run" for stage in stages_with("forward")
                            if "generate" not in STAGES[stage]])
def test_tools_without_a_cli_test_print_their_help(module):
    """The stages that generate have their --help checked flag by flag in test_cli.py."""
    proc = _run("-m", module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:") and "--model" in proc.stdout


def test_report_prints_a_committed_results_file_as_a_module():
    path = sorted((Path(REPO_ROOT) / "bench" / "results").glob("throughput-*.json"))[-1]
    proc = _run("-m", "bench.report", str(path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("throughput workload") and "tok/s" in proc.stdout


def test_constraints_pin_every_package_but_torch():
    """constraints.txt pins exact versions and leaves torch and what a torch build pins
    to the Makefile (a GPU user's CUDA build stays); `make install` uses it by default."""
    lines = [line for line in (Path(REPO_ROOT) / "constraints.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    names = [line.split("==")[0] for line in lines]
    assert all(re.fullmatch(r"[a-z0-9-]+==[\w.+!-]+", line) for line in lines), lines
    assert {"transformers", "tokenizers", "mkdocs-material", "pytest", "kernels"} <= set(names)
    assert not {"torch", "triton", "folovllm"} & set(names)
    assert not [n for n in names if n.startswith("nvidia-")]
    makefile = (Path(REPO_ROOT) / "Makefile").read_text()
    assert "-c constraints.txt" in makefile and re.search(r"^TORCH \?= torch==", makefile, re.M)
