"""`python -m m3_paged_kv.run`: generate text for many requests at once, paged KV cache.

Introduced in M1; M2 runs the requests together (continuous batching, at most
--max-batch-size per step) and, with --stream, prints each step's new text of every
request in it, so the interleaving shows. M3 keeps the KV cache in blocks and reports
how many it used. Prints a TTFT / TPOT / tokens-per-second table.
"""

import argparse
import sys

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
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--chat", help="a user message, sent through the chat template")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--max-batch-size", type=int, default=256,
                   help="the most requests that run in one step")
    return p.parse_args(argv)


def stream(engine: LLMEngine, request_ids: list[str]) -> dict:
    """Step the engine; print one line per step with the new text of each request in it."""
    printed = {rid: 0 for rid in request_ids}
    finished = {}
    step = 0
    while engine.has_unfinished_requests():
        parts = []
        for out in engine.step():
            new = out.text[printed[out.request_id]:]
            printed[out.request_id] = len(out.text)
            parts.append(f"{out.request_id}:{new!r}"
                         + (f"[{out.finish_reason}]" if out.finished else ""))
            if out.finished:
                finished[out.request_id] = out
        print(f"step {step:>3}  " + "  ".join(parts), flush=True)
        step += 1
    print()
    for rid in request_ids:
        print(f"--- {rid}\n{finished[rid].text}  [{finished[rid].finish_reason}]\n")
    return finished


def print_kv_cache(stats: dict) -> None:
    """Paged: requests hold only the blocks their tokens fill."""
    print(f"KV cache: {stats['num_blocks']} blocks x {stats['block_size']} tokens; at most "
          f"{stats['reserved_token_slots_peak']} token slots in held blocks for "
          f"{stats['used_token_slots_peak']} tokens, {stats['max_concurrent_seqs']} requests "
          f"at once, {stats['num_preemptions']} preemptions\n")


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
        llm = LLM(args.model, device=args.device, dtype=args.dtype,
                  max_batch_size=args.max_batch_size)
        if args.chat:
            prompts = [llm.chat_prompt([{"role": "user", "content": args.chat}])]
            shown = [args.chat]
        else:
            prompts = shown = args.prompt or DEFAULT_PROMPTS
        if args.stream:
            ids = [f"cli-{i}" for i in range(len(prompts))]
            for rid, prompt, text in zip(ids, prompts, shown):
                llm.engine.add_request(rid, prompt, params)
            print(f"(streaming {len(ids)} requests, up to {args.max_batch_size} per step)\n")
            done = stream(llm.engine, ids)
            outputs = [done[rid] for rid in ids]
        else:
            outputs = llm.generate(prompts, params)
            for text, out in zip(shown, outputs):
                print(f"--- {text!r}\n{out.text}  [{out.finish_reason}]\n")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_kv_cache(llm.engine.kv_cache_stats())
    print_metrics(outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
