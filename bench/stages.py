"""The one list of FoloVLLM's stages, in order: what the tests, bench, Makefile and docs read.

Every stage planned in DESIGN.md is listed; a stage is *present* once its package folder
(with `__init__.py`) exists in this checkout. Adding a stage means filling in its row
here (and its LESSON, docs page and notebook), nowhere else. Each stage has the features
of the one before plus the one its idea adds; a test asks for the stages that have a
feature through `stages_with(feature)`.

Files that cannot import this module are checked against it by tests/test_stages.py
(pyproject.toml's package list, mkdocs.yml's nav).

    python -m bench.stages             # the present stages' packages, one per line
    python -m bench.stages --newest    # the last present stage (the Makefile's NEWEST)
    python -m bench.stages --all       # every planned stage, present or not
    python -m bench.stages --milestones   # "m1,m2,m3": the present stages that generate
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Stage:
    short: str       # "m3": the bench's milestone name
    package: str     # "m3_paged_kv": the top-level package and folder
    title: str       # "paged KV": the docs nav shows "M3 · paged KV"
    feature: str     # the feature this stage's idea adds (tests select stages by feature)
    adds: str        # one line on what the idea adds (the docs' stage map)
    features: frozenset[str] = frozenset()  # this stage's feature and every earlier one

    @property
    def label(self) -> str:
        return self.short.upper()

    @property
    def path(self) -> Path:
        return REPO / self.package

    @property
    def present(self) -> bool:
        return (self.path / "__init__.py").is_file()


def _chain(*rows: tuple[str, str, str, str, str]) -> tuple[Stage, ...]:
    stages, features = [], frozenset()
    for short, package, title, feature, adds in rows:
        features = features | {feature}
        stages.append(Stage(short, package, title, feature, adds, features))
    return tuple(stages)


ALL_STAGES: tuple[Stage, ...] = _chain(
    ("m0", "m0_init", "init", "forward",
     "configs, sampling params, request types, model + tokenizer loading, one forward pass"),
    ("m1", "m1_basic", "basic", "generate",
     "generation loop with a contiguous KV cache, sampler, stop rules, metrics"),
    ("m2", "m2_batching", "batching", "batching",
     "continuous (iteration-level) batching, waiting/running queues"),
    ("m3", "m3_paged_kv", "paged KV", "paged",
     "block pool, block tables, preemption: the KV cache in small blocks"),
    ("m4", "m4_flash_attn", "flash attention", "flash_attn",
     "Triton flash attention over the paged cache for any mix, CUDA graphs by token count"),
    ("m5", "m5_chunked_prefill", "chunked prefill", "chunked_prefill",
     "one token budget per step, prefill chunks mixed with decodes"),
    ("m6", "m6_prefix_cache", "prefix cache", "prefix_cache",
     "hash-chained full-block prefix cache, ref counts, LRU eviction"),
    ("m7", "m7_gptq", "GPTQ", "gptq",
     "GPTQ quantizer, GPTQ checkpoint format, W4A16 Triton kernel"),
)


def present_stages() -> list[Stage]:
    """The stages whose package exists in this checkout, in order."""
    return [s for s in ALL_STAGES if s.present]


def newest() -> Stage:
    return present_stages()[-1]


def get(name: str) -> Stage:
    """A stage by short name ("m3") or package ("m3_paged_kv"); KeyError otherwise."""
    for s in ALL_STAGES:
        if name in (s.short, s.package):
            return s
    raise KeyError(name)


def stages_with(feature: str) -> list[str]:
    """Packages of the present stages that have `feature`."""
    known = {s.feature for s in ALL_STAGES}
    if feature not in known:
        raise KeyError(f"unknown feature {feature!r}; known: {sorted(known)}")
    return [s.package for s in present_stages() if feature in s.features]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.split("\n")[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--newest", action="store_true", help="only the last present stage")
    which.add_argument("--all", action="store_true", help="every planned stage")
    which.add_argument("--milestones", action="store_true",
                       help="the bench's names of the present stages that generate, m1,m2,...")
    args = p.parse_args(argv)
    if args.milestones:
        print(",".join(get(pkg).short for pkg in stages_with("generate")))
        return
    chosen = [newest()] if args.newest else list(ALL_STAGES) if args.all else present_stages()
    print("\n".join(s.package for s in chosen))


if __name__ == "__main__":
    main()
