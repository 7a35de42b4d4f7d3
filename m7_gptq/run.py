"""`python -m m7_gptq.run`: generate for many requests, with GPTQ 4-bit weights when given.

Prints each reply and a TTFT / TPOT / tokens-per-second table (--stream: the replies as
they are generated). --model takes a GPTQ checkpoint (a folder written by
`m7_gptq.quantize`, or any of the Llama family in format v1 or v2), and a line shows what the
weights take; --quantization gptq rounds a dummy model's weights to 4 bits. Also the
prefix cache, token budget, batch, attention and scheduling options of the stages before.

Introduced in M0; changed in M1 (generation), M2 (batching, --show-steps), M3 (the
blocks used), M4 (--attention-backend, --enforce-eager, --async-scheduling), M5 (a
token budget, chunks), M6 (--system, --n, the prefix cache), M7 (GPTQ checkpoints,
--quantization).
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
    p.add_argument("--system", help="a system prompt put before every prompt (with --chat, "
                                    "a system message): the requests share it, and the "
                                    "prefix cache computes it once")
    p.add_argument("--n", type=int, default=1,
                   help="replies sampled per prompt (needs --temperature > 0; "
                        "they share the prompt's KV cache blocks)")
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
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="the token budget of one step, decodes and prompt chunks together "
                        "(default %(default)s)")
    p.add_argument("--max-chunk-size", type=int, default=None,
                   help="the most tokens of one prompt in a step (default: the budget)")
    p.add_argument("--no-chunked-prefill", action="store_true",
                   help="M4's scheduler: whole prompts, in steps without decodes")
    p.add_argument("--quantization", choices=["gptq"], default=None,
                   help="a dummy model's weights rounded to 4 bits (groups of 64); a GPTQ "
                        "folder is recognized without it")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="M5's behaviour: every prompt is computed in full")
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
        print(f"step {step:>3}  " + ("  ".join(parts) or "(prompt chunks only: no token yet)"),
              flush=True)
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
    """Paged: requests hold only the blocks their tokens fill (M6: shared blocks count
    once among the slots, once per request among the tokens)."""
    print(f"KV cache: {stats['num_blocks']} blocks x {stats['block_size']} tokens; at most "
          f"{stats['reserved_token_slots_peak']} token slots in held blocks for the "
          f"{stats['used_token_slots_peak']} tokens of the requests, "
          f"{stats['max_concurrent_seqs']} requests "
          f"at once, {stats['num_preemptions']} preemptions")
    rate = stats["prefix_cache_hit_rate"]
    print("Prefix cache: " + ("off, or no prompt looked up" if rate is None else
          f"{stats['prefix_cache_hits']} of {stats['prefix_cache_queries']} prompt tokens "
          f"found cached ({rate:.0%})") + "\n")


def print_weights(sizes: dict) -> None:
    """M7: what the weights take, and the GPTQ layers' share against the same layers
    unquantized."""
    line = f"Weights: {sizes['total'] / 2**20:.1f} MiB"
    if sizes["gptq_layers"]:
        line += (f"; {sizes['gptq_layers']} GPTQ layers ({sizes['gptq_layout']}) take "
                 f"{sizes['quantized'] / 2**20:.1f} MiB, {sizes['quantized'] / sizes['dense']:.2f}"
                 f" x their {sizes['dense'] / 2**20:.1f} MiB unquantized")
    if sizes.get("gptq_merged_kept_apart"):
        line += (f"; {sizes['gptq_merged_kept_apart']} merged q/k/v or gate/up layers kept "
                 "in parts (their g_idx differ in the checkpoint)")
    print(line)


def print_runner(info: dict, config) -> None:
    """Which attention ran, whether steps were CUDA graphs, and how steps were filled."""
    graphs = info["cuda_graphs"]
    how = (f"steps of up to {graphs['max_tokens']} tokens replay CUDA graphs "
           f"({graphs['num_graphs']} graphs of {graphs['num_sizes']} sizes, captured in "
           f"{graphs['capture_seconds']:.1f} s, {graphs['memory_bytes'] / 2**20:.0f} MiB)"
           if graphs is not None else "every step runs eager (no CUDA graphs)")
    steps = (f"chunked prefill, {config.max_num_batched_tokens} tokens a step"
             if config.enable_chunked_prefill else "whole prompts, then decodes (M4)")
    ahead = ("the next step scheduled while one runs" if info["async_scheduling"]
             else "each step scheduled after the last one's results")
    print(f"Attention: {info['attention_backend']} backend; {how}\nScheduler: {steps}; "
          f"{ahead}\n")


def print_metrics(outputs) -> None:
    print(f"{'request':>8} {'in':>5} {'cached':>7} {'out':>5} {'TTFT ms':>9} {'TPOT ms':>9} "
          f"{'tok/s':>8}")
    for i, out in enumerate(outputs):
        m = out.metrics
        rate = m.num_output_tokens / m.e2e_latency if m.e2e_latency else 0.0
        print(f"{i:>8} {len(out.prompt_token_ids):>5} {out.num_cached_tokens:>7} "
              f"{m.num_output_tokens:>5} {m.ttft * 1e3:>9.1f} {m.tpot * 1e3:>9.2f} {rate:>8.1f}")


def build_prompts(llm: LLM, args) -> tuple[list, list[str]]:
    """The prompts to run and how to show each: --chat or --prompt (or the built-in
    ones), each after the --system text when given."""
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        return [llm.chat_prompt(system + [{"role": "user", "content": args.chat}])], [args.chat]
    shown = args.prompt or DEFAULT_PROMPTS
    return [f"{args.system}\n{p}" if args.system else p for p in shown], shown


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, max_tokens=args.max_tokens,
                                seed=args.seed, ignore_eos=args.ignore_eos, n=args.n)
        if args.n > 1 and (args.stream or args.show_steps):
            raise ValueError("--n: the samples are printed when done; not with --stream "
                             "or --show-steps")
        llm = LLM(args.model, device=args.device, dtype=args.dtype,
                  max_batch_size=args.max_batch_size,
                  attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
                  async_scheduling=args.async_scheduling,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  max_chunk_size=args.max_chunk_size,
                  enable_chunked_prefill=not args.no_chunked_prefill,
                  enable_prefix_caching=not args.no_prefix_caching,
                  quantization=args.quantization)
        prompts, shown = build_prompts(llm, args)
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
                for sample in out.outputs:  # M6: n of them with --n
                    label = f" (sample {sample.index})" if len(out.outputs) > 1 else ""
                    print(f"--- {text!r}{label}\n{sample.text}  [{sample.finish_reason}]\n")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_weights(llm.engine.describe_runner()["weights"])
    print_kv_cache(llm.engine.kv_cache_stats())
    print_runner(llm.engine.describe_runner(), llm.config)
    print_metrics(outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
