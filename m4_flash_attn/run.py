"""`python -m m4_flash_attn.run`: generate text for many requests at once, Triton
attention.

Prints each reply and a TTFT / TPOT / tokens-per-second table (--stream: the replies as
they are generated). The requests run together, at most --max-batch-size per step
(--show-steps: each step's new text). --attention-backend picks the Triton kernels or
the torch reference, steps replay CUDA graphs unless --enforce-eager, and the next step
is scheduled while one runs with --async-scheduling; the closing lines show the KV
cache's blocks and how steps ran.

Introduced in M0; changed in M1 (generation), M2 (batching, --show-steps), M3 (the
blocks used), M4 (--attention-backend, --enforce-eager, --async-scheduling).
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
    p.add_argument("--max-batch-size", type=int, default=256,
                   help="the most requests that run in one step (default %(default)s)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "flash", "torch"],
                   help="flash: the Triton kernels; torch: the PyTorch reference (auto: flash "
                        "on CUDA, torch on the CPU, where flash runs Triton's slow interpreter)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: launch every kernel of every step from Python")
    p.add_argument("--async-scheduling", action="store_true",
                   help="schedule the next step while this one runs on the device")
    p.add_argument("--show-steps", action="store_true",
                   help="instead of flowing text, print one line per engine step with the "
                        "new text of every request in it (continuous batching interleaves "
                        "them), then the replies, the KV cache line and the table")
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


def show_steps(engine: LLMEngine, request_ids: list[str]) -> dict:
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


def metrics_line(outputs, seconds: float) -> str:
    """One line: tokens, wall time, TTFT and TPOT (means if several), tokens per second."""
    ms = [out.metrics for out in outputs]
    tokens = sum(m.num_output_tokens for m in ms)
    ttft = sum(m.ttft for m in ms) / len(ms)
    tpot = sum(m.tpot for m in ms) / len(ms)
    several, mean = (f"{len(ms)} requests, ", "mean ") if len(ms) > 1 else ("", "")
    return (f"{several}{tokens} tokens in {seconds:.2f} s · {mean}TTFT {ttft * 1e3:.0f} ms · "
            f"{mean}TPOT {tpot * 1e3:.1f} ms · {tokens / seconds:.1f} tok/s")


def print_kv_cache(stats: dict) -> None:
    """Paged: requests hold only the blocks their tokens fill."""
    print(f"KV cache: {stats['num_blocks']} blocks x {stats['block_size']} tokens; at most "
          f"{stats['reserved_token_slots_peak']} token slots in held blocks for "
          f"{stats['used_token_slots_peak']} tokens, {stats['max_concurrent_seqs']} requests "
          f"at once, {stats['num_preemptions']} preemptions\n")


def print_runner(info: dict) -> None:
    """Which attention ran, whether steps were CUDA graphs, and scheduled ahead."""
    graphs = info["cuda_graphs"]
    how = (f"steps of up to {graphs['max_tokens']} tokens replay CUDA graphs "
           f"({graphs['num_graphs']} graphs of {graphs['num_sizes']} sizes, captured in "
           f"{graphs['capture_seconds']:.1f} s, {graphs['memory_bytes'] / 2**20:.0f} MiB)"
           if graphs is not None else "every step runs eager (no CUDA graphs)")
    ahead = ("the next step scheduled while one runs" if info["async_scheduling"]
             else "each step scheduled after the last one's results")
    print(f"Attention: {info['attention_backend']} backend; {how}\nScheduler: {ahead}\n")


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
                  max_batch_size=args.max_batch_size,
                  attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
                  async_scheduling=args.async_scheduling)
        if args.chat:
            prompts = [llm.chat_prompt([{"role": "user", "content": args.chat}])]
            shown = [args.chat]
        else:
            prompts = shown = args.prompt or DEFAULT_PROMPTS
        if args.show_steps:
            ids = add_requests(llm.engine, prompts, params)
            print(f"(streaming {len(ids)} requests, up to {args.max_batch_size} per step)\n")
            done = show_steps(llm.engine, ids)
            outputs = [done[rid] for rid in ids]
        elif args.stream:
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
    print_kv_cache(llm.engine.kv_cache_stats())
    print_runner(llm.engine.describe_runner())
    print_metrics(outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
