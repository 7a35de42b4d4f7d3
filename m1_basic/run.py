"""`python -m m1_basic.run`: generate text with a KV cache, one request at a time.

Generates for a few prompts (or --prompt / --chat) and prints each reply with a TTFT /
TPOT / tokens-per-second table; with --stream the replies flow as they are generated,
then one metrics line.

Introduced in M0; changed in M1 (generation).
"""

import argparse
import sys
import time

from .engine.llm_engine import LLMEngine
from .llm import LLM
from .sampling_params import SamplingParams

DEFAULT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Three things to pack for a beach holiday:",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {__package__}.run",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), dummy:NAME, or a local HF folder")
    p.add_argument("--prompt", action="append",
                   help="a prompt (repeat for several); without --prompt or --chat, "
                        "three built-in prompts")
    p.add_argument("--chat", help="a user message, sent through the chat template")
    p.add_argument("--stream", action="store_true",
                   help="print the replies as text while they are generated, then one "
                        "metrics line. Replies show in order: the one at the front flows "
                        "as it grows; one generated alongside it appears, all it has so "
                        "far at once, when the reply before it is done, and flows from there")
    p.add_argument("--max-tokens", type=int, default=48,
                   help="the most tokens to generate for each reply (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample only from the most likely tokens that together reach this "
                        "probability (1 keeps all)")
    p.add_argument("--top-k", type=int, default=-1,
                   help="sample only from the k most likely tokens (-1 keeps all)")
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past the end-of-sequence token, up to --max-tokens")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs (auto: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights and KV cache dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    return p.parse_args(argv)


def add_requests(engine: LLMEngine, prompts: list, params: SamplingParams) -> list[str]:
    """Hand every prompt to the engine; the request ids, in prompt order."""
    ids = [f"cli-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    return ids


def stream_text(engine: LLMEngine, request_ids: list[str], shown: list[str]) -> dict:
    """Step the engine; print the replies in order, the one at the front as it grows."""
    latest = {}
    front, printed = 0, 0
    print(f"--- {shown[0]!r}", flush=True)
    while engine.has_unfinished_requests():
        for out in engine.step():
            latest[out.request_id] = out
        while front < len(request_ids) and request_ids[front] in latest:
            out = latest[request_ids[front]]
            print(out.text[printed:], end="", flush=True)
            printed = len(out.text)
            if not out.finished:
                break
            print(f"  [{out.finish_reason}]\n", flush=True)
            front, printed = front + 1, 0
            if front < len(request_ids):
                print(f"--- {shown[front]!r}", flush=True)
    return latest


def metrics_line(outputs, seconds: float) -> str:
    """One line: tokens, wall time, TTFT and TPOT (means if several), tokens per second."""
    ms = [out.metrics for out in outputs]
    tokens = sum(m.num_output_tokens for m in ms)
    ttft = sum(m.ttft for m in ms) / len(ms)
    tpot = sum(m.tpot for m in ms) / len(ms)
    several, mean = (f"{len(ms)} requests, ", "mean ") if len(ms) > 1 else ("", "")
    return (f"{several}{tokens} tokens in {seconds:.2f} s · {mean}TTFT {ttft * 1e3:.0f} ms · "
            f"{mean}TPOT {tpot * 1e3:.1f} ms · {tokens / seconds:.1f} tok/s")


def print_metrics(outputs) -> None:
    print(f"{'request':>8} {'in':>5} {'out':>5} {'TTFT ms':>9} {'TPOT ms':>9} {'tok/s':>8}")
    for i, out in enumerate(outputs):
        m = out.metrics
        rate = m.num_output_tokens / m.e2e_latency if m.e2e_latency else 0.0
        print(f"{i:>8} {len(out.prompt_token_ids):>5} {m.num_output_tokens:>5} "
              f"{m.ttft * 1e3:>9.1f} {m.tpot * 1e3:>9.2f} {rate:>8.1f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, max_tokens=args.max_tokens,
                                seed=args.seed, ignore_eos=args.ignore_eos)
        llm = LLM(args.model, device=args.device, dtype=args.dtype)
        if args.chat:
            prompts = [llm.chat_prompt([{"role": "user", "content": args.chat}])]
            shown = [args.chat]
        else:
            prompts = shown = args.prompt or DEFAULT_PROMPTS
        if args.stream:
            start = time.perf_counter()
            ids = add_requests(llm.engine, prompts, params)
            done = stream_text(llm.engine, ids, shown)
            print(metrics_line([done[rid] for rid in ids], time.perf_counter() - start))
            return 0
        else:
            outputs = llm.generate(prompts, params)
            for text, out in zip(shown, outputs):
                print(f"--- {text!r}\n{out.text}  [{out.finish_reason}]\n")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_metrics(outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
