"""The checks' side of `python -m exercises check`: which package each exercise's tests
import, and a report of every test's outcome for the runner to read.

FOLOVLLM_EXERCISE_PACKAGES (JSON: exercise id -> package name) says which exercises run:
tests of the others are deselected. A test marked `@pytest.mark.exercise("m3.2")` asks
the `stage` fixture for modules: `stage("core.block_pool")` imports that module of the
package built for m3.2. FOLOVLLM_EXERCISE_REPORT names the JSON file the outcomes go to.
"""

import importlib
import json
import os

import pytest

PACKAGES = json.loads(os.environ.get("FOLOVLLM_EXERCISE_PACKAGES", "{}"))
_outcomes: list[dict] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "exercise(id): the exercise this test checks")


def exercise_of(item) -> str | None:
    mark = item.get_closest_marker("exercise")
    return mark.args[0] if mark else None


def pytest_collection_modifyitems(config, items):
    chosen = [item for item in items if exercise_of(item) in PACKAGES]
    dropped = [item for item in items if exercise_of(item) not in PACKAGES]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = chosen


@pytest.fixture
def stage(request):
    """stage("core.block_pool") -> that module of the package this test's exercise runs on."""
    package = PACKAGES[exercise_of(request.node)]

    def module(name: str = ""):
        return importlib.import_module(f"{package}.{name}" if name else package)
    return module


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        _outcomes.append({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                          "error": report.longreprtext if report.failed else ""})


def pytest_collectreport(report):
    if report.failed:
        _outcomes.append({"test": report.nodeid, "when": "collect", "outcome": "failed",
                          "error": report.longreprtext})


def pytest_sessionfinish(session):
    path = os.environ.get("FOLOVLLM_EXERCISE_REPORT")
    if path:
        items = {item.nodeid: exercise_of(item) for item in session.items}
        for outcome in _outcomes:
            outcome["exercise"] = items.get(outcome["test"])
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_outcomes, f, indent=1)
