"""GPU smoke check of any stage against transformers: TPOT for 128/128 and agreement.

Run on the GPU machine: `python3 tools/gpu_smoke.py [STAGE] [DUMMY]` (default
m1_basic qwen2.5-0.5b; STAGE is any generating stage of `bench/stages.py`, by package or
short name). Prints, in one process on the same dummy weights: the stage's TPOT and
transformers `generate`'s for a 128-token prompt and 128 greedy tokens, the gap between
the stage's next-token log-probabilities (`SamplingParams(logprobs=5)`) and
transformers' log-softmax, and how many of the 128 greedy tokens agree (bf16: random
weights make near-ties, so a few divergences are expected).
"""

import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from bench import stages  # noqa: E402

STAGE = stages.get(sys.argv[1] if len(sys.argv) > 1 else "m1").package
NAME = sys.argv[2] if len(sys.argv) > 2 else "qwen2.5-0.5b"
stage = importlib.import_module(STAGE)
DUMMY_CONFIGS = importlib.import_module(f"{STAGE}.model_executor.model_loader").DUMMY_CONFIGS


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


llm = stage.LLM(f"dummy:{NAME}", device="cuda")
g = torch.Generator().manual_seed(1)
prompt = torch.randint(0, 5000, (128,), generator=g).tolist()
params = stage.SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
llm.generate([prompt[:16]], stage.SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
for _ in range(3):
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    print(f"{STAGE} TPOT ms {out.metrics.tpot * 1e3:.3f}  TTFT ms {out.metrics.ttft * 1e3:.2f}")

hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**DUMMY_CONFIGS[NAME]),
                                      dtype=torch.bfloat16).cuda().eval()
hf.load_state_dict(llm.engine.model_runner.model.state_dict(), strict=False)
ids = torch.tensor([prompt], device="cuda")
with torch.no_grad():
    ref = hf(ids).logits[0, -1].float().log_softmax(-1)
first = llm.generate([prompt], stage.SamplingParams(temperature=0, max_tokens=1, logprobs=5),
                     use_tqdm=False)[0].outputs[0].logprobs[0]
gap = max(abs(lp.logprob - ref[token].item()) for token, lp in first.items())
print(f"next-token logprobs: max |ours - transformers| {gap:.4f} over {sorted(first)}; "
      f"transformers' top-5 {ref.topk(5).indices.tolist()}")
mask = torch.ones_like(ids)
hf.generate(ids[:, :16], attention_mask=mask[:, :16], max_new_tokens=8, do_sample=False)
for _ in range(3):
    _, t1 = timed(lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=1,
                                      min_new_tokens=1, do_sample=False))
    o, t128 = timed(lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=128,
                                        min_new_tokens=128, do_sample=False))
    print(f"hf TPOT ms {(t128 - t1) / 127 * 1e3:.3f}  TTFT ms {t1 * 1e3:.2f}")
match = sum(int(x == y) for x, y in zip(o[0, 128:].tolist(), out.token_ids))
print(f"greedy tokens that agree, {STAGE} vs transformers (bf16): {match}/128")
