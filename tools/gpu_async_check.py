"""Async scheduling on a GPU: the same outputs as the synchronous engine, and its speed.

`python3 tools/gpu_async_check.py [--stages m4_flash_attn,...] [--out FILE]`. For each
stage, on CUDA with `dummy:qwen2.5-0.5b` and CUDA graphs: one batch of mixed requests
(greedy, seeded, stop tokens, min_tokens, penalties, logprobs) with async_scheduling on
and off must give the same token ids (in float32: the two modes batch the last steps
differently, and bf16 sums of another batch can flip a near-tie); then, in bf16, a timed
batch (64 prompts of 128 tokens, 128 greedy tokens each, after a warm-up) with it off
and on, output tokens per second. The JSON records the card and both rates.
"""

import argparse
import importlib
import json
import time

import torch


def mixed_params(SP) -> list:
    return [SP(temperature=0, max_tokens=40, ignore_eos=True),
            SP(temperature=0.9, top_p=0.9, seed=7, max_tokens=40, ignore_eos=True),
            SP(temperature=0.8, top_k=20, seed=3, max_tokens=40, stop_token_ids=[5, 9, 17]),
            SP(temperature=0, max_tokens=40, min_tokens=5, stop_token_ids=[5, 9, 17, 33]),
            SP(temperature=1.0, seed=11, max_tokens=40, repetition_penalty=1.4,
               ignore_eos=True),
            SP(temperature=0.7, seed=5, max_tokens=40, logprobs=3, ignore_eos=True)]


def check_stage(stage: str, batch: int, tokens: int) -> dict:
    mod = importlib.import_module(stage)
    prompts = [[3 + (i * 37 + j * 11) % 30000 for j in range(20 + 7 * i)] for i in range(12)]
    params = (mixed_params(mod.SamplingParams) * 2)[:len(prompts)]
    timed_prompts = [[3 + (i * 13 + j * 7) % 30000 for j in range(128)] for i in range(batch)]
    timed = mod.SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    row = {"stage": stage}
    outputs = {}
    for mode in (False, True):
        llm = mod.LLM("dummy:qwen2.5-0.5b", device="cuda", dtype="float32",
                      async_scheduling=mode, gpu_memory_utilization=0.4)
        outputs[mode] = [o.outputs[0].token_ids for o in
                         llm.generate(prompts, params, use_tqdm=False)]
        del llm
        torch.cuda.empty_cache()
        llm = mod.LLM("dummy:qwen2.5-0.5b", device="cuda", async_scheduling=mode,
                      gpu_memory_utilization=0.4)
        assert llm.engine.describe_runner()["async_scheduling"] is mode
        llm.generate(timed_prompts[:8], timed, use_tqdm=False)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        done = llm.generate(timed_prompts, timed, use_tqdm=False)
        seconds = time.perf_counter() - start
        row["tok_s_async" if mode else "tok_s_sync"] = sum(
            len(o.outputs[0].token_ids) for o in done) / seconds
        del llm
        torch.cuda.empty_cache()
    row["same_tokens"] = outputs[True] == outputs[False]
    row["speedup"] = row["tok_s_async"] / row["tok_s_sync"]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="m4_flash_attn")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = [check_stage(s, args.batch, args.tokens) for s in args.stages.split(",")]
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    assert all(r["same_tokens"] for r in rows), "async outputs differ from sync"


if __name__ == "__main__":
    main()
