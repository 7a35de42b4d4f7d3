"""The stage registry (bench/stages.py) and the files that cannot read it agree with it.

The registry lists every planned stage; a stage is present once its package exists.
pyproject.toml's package list and mkdocs.yml's nav are static, so they are checked here:
no stage package goes unregistered, every present stage is packaged, has a docs page
and a notebook in the nav (in registry order), and nothing is listed that is not one.
"""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from bench import stages  # noqa: E402

PRESENT = stages.present_stages()


def test_registry_is_a_chain_of_stages():
    assert [s.short for s in stages.ALL_STAGES] == [f"m{i}" for i in range(len(stages.ALL_STAGES))]
    for s in stages.ALL_STAGES:
        assert s.package.startswith(f"{s.short}_"), s
    for before, after in zip(stages.ALL_STAGES, stages.ALL_STAGES[1:]):
        assert after.features == before.features | {after.feature}, after
        assert after.feature not in before.features, after
    # Stages land in order: the present ones are the first few.
    assert PRESENT == list(stages.ALL_STAGES[:len(PRESENT)]) and PRESENT
    assert stages.stages_with("forward") == [s.package for s in PRESENT]
    assert stages.get("m1") is stages.get("m1_basic")


def test_every_stage_folder_is_registered():
    folders = {p.name for p in REPO_ROOT.iterdir()
               if p.is_dir() and re.fullmatch(r"m\d+_\w+", p.name)}
    unregistered = folders - {s.package for s in stages.ALL_STAGES}
    assert not unregistered, f"add these stages to bench/stages.py: {sorted(unregistered)}"


def test_cli_newest_and_milestones():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "bench.stages", *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=60, check=True).stdout
    assert run("--newest").strip() == PRESENT[-1].package
    assert run().split() == [s.package for s in PRESENT]
    assert run("--milestones").strip() == ",".join(
        s.short for s in PRESENT if "generate" in s.features)
    assert "$(PYTHON) -m bench.stages --newest" in (REPO_ROOT / "Makefile").read_text()


def test_pyproject_packages_every_registered_stage():
    """Each registered stage (present or planned: one that lands needs no edit), bench and
    serve (the server over the stages) and exercises."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    expected = [f"{s.package}*" for s in stages.ALL_STAGES] + ["bench*", "serve*", "exercises*"]
    assert include == expected, (f"pyproject.toml [tool.setuptools.packages.find] include "
                                 f"should be {expected}")


class _Loader(yaml.SafeLoader):
    """mkdocs.yml's `!ENV` and `!!python/name:` tags read as None."""


_Loader.add_multi_constructor("", lambda loader, suffix, node: None)


def _nav_section(name: str) -> list[tuple[str, str]]:
    config = yaml.load((REPO_ROOT / "mkdocs.yml").read_text(), Loader=_Loader)
    section = next(item[name] for item in config["nav"] if isinstance(item, dict) and name in item)
    return [next(iter(entry.items())) for entry in section]


def test_mkdocs_nav_has_a_page_per_present_stage():
    expected = [(f"{s.label} · {s.title}", f"{s.package}.md") for s in PRESENT]
    assert _nav_section("Stages") == expected, f"mkdocs.yml nav 'Stages' should be {expected}"
    for _, page in expected:
        assert (REPO_ROOT / "docs" / page).is_file(), f"docs/{page} is missing"


def test_mkdocs_nav_has_a_notebook_per_present_stage():
    expected = [(f"{s.label} notebook", f"notebooks/{s.package}.ipynb") for s in PRESENT]
    assert _nav_section("Notebooks") == expected, f"mkdocs.yml nav 'Notebooks' should be {expected}"
    for _, notebook in expected:
        assert (REPO_ROOT / notebook).is_file(), f"{notebook} is missing"


def test_readme_names_every_present_stage():
    readme = (REPO_ROOT / "README.md").read_text()
    missing = [s.package for s in PRESENT if f"`{s.package}`" not in readme]
    assert not missing, f"README.md's stage table does not name {missing}"
