"""Test setup: the stage registry, shared fixtures, and the `gpu` marker.

Each stage joins the suite by adding one line to STAGES, naming the features it has.
A test asks for the stages with a feature through `stages_with(feature)`.
"""

import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests

import pytest
import torch

# stage package -> features it has (each stage has the features of the one before)
STAGES: dict[str, set[str]] = {
    "m0_init": {"forward"},
    "m1_basic": {"forward", "generate"},
}


def stages_with(feature: str) -> list[str]:
    return [name for name, features in STAGES.items() if feature in features]


def load_stage(name: str):
    return importlib.import_module(name)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
