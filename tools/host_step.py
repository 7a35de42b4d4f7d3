"""The host's share of a decode step, with the model left out: `python3 tools/host_step.py`.

A lead's tool (issue 23). On the CPU, for each stage (M4 on) it builds an engine on
`dummy:tiny-llama`, adds `--batch` greedy requests with random prompts, runs their
prefills and a few warm-up steps, then times `--steps` decode steps of the whole batch in
which the model's forward pass is replaced by random logits: the inputs are still built
(`InputBatch.prepare`), tokens sampled, stop rules, text and outputs made. Host ms is a
step's thread CPU time less the stand-in's logits and the sampler: the Python work that
a GPU step cannot overlap with anything but the GPU. Thread time, not wall time, and the
least of `--repeats` runs: other work on the machine moves it less.

    python3 tools/host_step.py --stages m4,m7 --batch 256            # ~1 min
    python3 tools/host_step.py --stages m7 --batch 64 --async-scheduling --profile 15
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the stages and `bench` importable
    sys.path.insert(0, str(REPO))

from bench import stages  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 tools/host_step.py", description=(
        "Host CPU time per decode step, the model's forward pass left out (CPU)."))
    p.add_argument("--stages", default="m4,m7",
                   help="comma-separated stages from M4 on (short or package names)")
    p.add_argument("--batch", type=int, default=256, help="sequences per step")
    p.add_argument("--prompt-len", type=int, default=200, help="tokens per prompt")
    p.add_argument("--steps", type=int, default=40, help="decode steps timed per run")
    p.add_argument("--repeats", type=int, default=5, help="runs per stage; the least counts")
    p.add_argument("--async-scheduling", action="store_true",
                   help="with async scheduling (the next step launched before the last "
                        "one's tokens are applied)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the runs, print the N functions with the most own time")
    args = p.parse_args(argv)
    for name in ("batch", "prompt_len", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        args.stages = [stages.get(s) for s in args.stages.split(",")]
    except KeyError as exc:
        p.error(f"--stages: no stage {exc} (m4..m7, or their package names)")
    late = [s.short for s in args.stages if "flash_attn" not in s.features]
    if late:
        p.error(f"--stages: {', '.join(late)} come before M4 (no launch/apply split)")
    return args


class _Timed:
    """Calls `inner`, adding the thread time it took to `clock['device']`."""

    def __init__(self, inner, clock: dict) -> None:
        self.inner, self.clock = inner, clock

    def __call__(self, *args, **kwargs):
        start = time.thread_time()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.clock["device"] += time.thread_time() - start

    def __getattr__(self, name):
        return getattr(self.inner, name)


def build_engine(package: str, args: argparse.Namespace, clock: dict):
    """An engine whose forward pass is random logits (their making timed as device work)."""
    import importlib

    import torch

    stage = importlib.import_module(package)
    max_tokens = args.steps + 10  # no sequence ends inside the timed steps
    llm = stage.LLM("dummy:tiny-llama", device="cpu", max_batch_size=args.batch,
                    max_num_batched_tokens=args.batch * args.prompt_len,
                    max_model_len=args.prompt_len + max_tokens + 8,
                    async_scheduling=args.async_scheduling)
    engine, runner = llm.engine, llm.engine.model_runner
    vocab = engine.vocab_size
    generator = torch.Generator().manual_seed(0)

    def random_logits(scheduled):
        num_tokens = sum(len(s.new_token_ids) for s in scheduled)
        inputs = runner.input_batch.prepare(scheduled, pad_to=runner._padded_shape(num_tokens))
        start = time.thread_time()
        logits = torch.randn(len(runner.input_batch.sampled), vocab, generator=generator)
        clock["device"] += time.thread_time() - start
        return logits, runner.input_batch.sampled, None, inputs

    runner._logits_for_step = random_logits
    runner.sampler = _Timed(runner.sampler, clock)
    params = stage.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompts = torch.randint(3, 500, (args.batch, args.prompt_len), generator=generator)
    for i, prompt in enumerate(prompts.tolist()):
        engine.add_request(str(i), prompt, params)
    return engine


def one_run(package: str, args: argparse.Namespace, profiler=None) -> dict:
    clock = {"device": 0.0}
    engine = build_engine(package, args, clock)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.sequences.values()):
        engine.step()  # the prefills
    for _ in range(3):
        engine.step()
    clock["device"] = 0.0
    if profiler is not None:
        profiler.enable()
    start = time.thread_time()
    for _ in range(args.steps):
        engine.step()
    total = time.thread_time() - start
    if profiler is not None:
        profiler.disable()
    return {"step_ms": total / args.steps * 1e3,
            "host_ms": (total - clock["device"]) / args.steps * 1e3}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    mode = "async scheduling" if args.async_scheduling else "synchronous"
    print(f"host ms per decode step: batch {args.batch}, {args.prompt_len}-token prompts, "
          f"{mode}, the least of {args.repeats} runs of {args.steps} steps (thread time)")
    for stage in args.stages:
        runs = [one_run(stage.package, args) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["host_ms"])
        print(f"  {stage.package:20s} host {best['host_ms']:.2f} ms  "
              f"(whole step with the stand-in model {best['step_ms']:.2f} ms)")
        if args.profile:
            profiler = cProfile.Profile()
            one_run(stage.package, args, profiler)
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.profile)
            print(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
