"""`python -m m7_gptq.eval_ppl`: perplexity of models on held-out text, through the engine.

Perplexity is exp(-mean log p(token | the tokens before it)); a quantized model's rise
over its original is what quantization cost. The text is the held-out half of
`calibration.py` (or a file), cut into the same windows for every model; each window is
a prompt with `prompt_logprobs=0`, so a checkpoint is scored through the engine's own
layers. `--out` writes JSON with the run's provenance and how each checkpoint was made.

    python -m m7_gptq.eval_ppl --model default --model /tmp/q4 --max-tokens 32768

Introduced in M7.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from . import calibration
from .llm import LLM
from .sampling_params import SamplingParams


def window_logprobs(llm: LLM, windows: list[list[int]], batch: int = 8,
                    progress: bool = True) -> list[float]:
    """The log-probability of every token of every window but its first."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    logprobs = []
    with tqdm(total=len(windows), desc="windows", unit="win", disable=not progress) as bar:
        for start in range(0, len(windows), batch):
            for out in llm.generate(windows[start:start + batch], params, use_tqdm=False):
                for token, position in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
                    logprobs.append(position[token].logprob)
            bar.update(len(windows[start:start + batch]))
    return logprobs


def perplexity(model: str, num_windows: int, seq_len: int, text_file: str | None = None,
               device: str = "auto", progress: bool = True) -> dict:
    """One model's perplexity on the held-out windows (or a file's), and what it took."""
    llm = LLM(model, device=device, enable_prefix_caching=False)
    windows = calibration.get_windows(llm.tokenizer, num_windows, seq_len, split="heldout",
                                      text_file=text_file)
    start = time.perf_counter()
    logprobs = window_logprobs(llm, windows, progress=progress)
    nll = -sum(logprobs) / len(logprobs)
    return dict(model=model, perplexity=math.exp(nll), nll=nll, tokens=len(logprobs),
                windows=len(windows), seq_len=seq_len, seconds=time.perf_counter() - start,
                quantization=getattr(llm.engine.model_runner.model_config, "quantization_config",
                                         None),
                device=str(llm.engine.model_runner.device), checkpoint=checkpoint_log(model))


def checkpoint_log(model: str) -> dict | None:
    """How a checkpoint folder was made: its quantize_log.json without the per-layer
    errors (None for a model without one, e.g. 'default')."""
    log = Path(model).expanduser() / "quantize_log.json"
    if not log.is_file():
        return None
    return {key: value for key, value in json.loads(log.read_text()).items() if key != "layers"}


def table(results: list[dict]) -> str:
    base = results[0]["perplexity"]
    lines = [f"{'model':<40} {'perplexity':>10} {'Δ vs first':>11} {'tokens':>8}"]
    for r in results:
        delta = r["perplexity"] - base
        lines.append(f"{r['model']:<40} {r['perplexity']:>10.4f} {delta:>+11.4f} "
                     f"{r['tokens']:>8}")
    return "\n".join(lines)


def provenance(argv: list[str], device: str, tool: str = "eval_ppl") -> dict:
    """Where a result comes from, in the bench's fields: the command (`python -m
    m7_gptq.TOOL ARGV`), git commit and dirty flag, date, machine (with the GPU when
    `device` is one) and versions. The quantizer's log uses it too."""
    import torch

    commit, dirty = git_state()
    gpu = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() \
        else None
    return {"command": shlex.join(["python", "-m", f"{__package__}.{tool}", *argv]),
            "git_commit": commit, "git_dirty": dirty,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"gpu": gpu, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                        "hostname": platform.node()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda, **{name: _version(name) for name in
                                                        ("triton", "transformers", "numpy")}}}


def git_state() -> tuple[str | None, bool | None]:
    """(HEAD, whether tracked files differ from it) of the checkout this package is in;
    FOLOVLLM_GIT_COMMIT and FOLOVLLM_GIT_DIRTY=0/1 name them for a copy without .git."""
    if os.environ.get("FOLOVLLM_GIT_COMMIT"):
        return (os.environ["FOLOVLLM_GIT_COMMIT"],
                {"0": False, "1": True}.get(os.environ.get("FOLOVLLM_GIT_DIRTY", "")))
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    head, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return head, None if head is None or status is None else bool(status)


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {__package__}.eval_ppl",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append",
                   help="a model ('default', dummy:NAME or a folder); repeat to compare, "
                        "the first is the baseline (default: 'default')")
    p.add_argument("--max-tokens", type=int, default=32768,
                   help="tokens to score in all, in windows of --seq-len (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--text-file", help="a UTF-8 text file to score instead of the held-out "
                                       "half of the standard library's docstrings")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.model = args.model or ["default"]
    if args.seq_len < 2 or args.max_tokens < args.seq_len:
        p.error(f"--max-tokens ({args.max_tokens}) must hold at least one window of "
                f"--seq-len ({args.seq_len}) tokens, and --seq-len must be >= 2")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    results = []
    for model in args.model:
        try:
            results.append(perplexity(model, args.max_tokens // args.seq_len, args.seq_len,
                                      args.text_file, args.device, not args.no_progress))
        except ValueError as exc:
            print(f"error: {model}: {exc}", file=sys.stderr)
            return 2
        print(f"{model}: perplexity {results[-1]['perplexity']:.4f} over "
              f"{results[-1]['tokens']} tokens ({results[-1]['seconds']:.1f} s)")
    print(table(results))
    if args.out:
        device = "cuda" if results[0]["device"].startswith("cuda") else "cpu"
        report = dict(provenance(argv, device), text=args.text_file or "stdlib:heldout",
                      seq_len=args.seq_len, results=results)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
