"""GPU smoke check for the lead: m1 on CUDA vs transformers generate, TPOT for 128/128.

Run on the GPU machine: `python3 tools/gpu_smoke.py`. Prints TPOT of m1 and of
transformers `generate` on the same dummy weights, in the same process.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from m1_basic import LLM, SamplingParams
from m1_basic.model_executor.model_loader import DUMMY_CONFIGS

NAME = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-0.5b"
llm = LLM(f"dummy:{NAME}", device="cuda")
g = torch.Generator().manual_seed(1)
prompt = torch.randint(0, 5000, (128,), generator=g).tolist()
params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
llm.generate([prompt[:16]], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
tpots = []
for _ in range(3):
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    tpots.append(out.metrics.tpot)
print(f"m1 TPOT ms: {[round(t * 1e3, 3) for t in tpots]}, TTFT ms {out.metrics.ttft * 1e3:.2f}")

cfg = dict(DUMMY_CONFIGS[NAME])
hf_config = AutoConfig.for_model(**cfg)
hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).cuda().eval()
missing = hf.load_state_dict(llm.model_runner.model.state_dict(), strict=False)
print("hf load:", missing)
ids = torch.tensor([prompt], device="cuda")
with torch.no_grad():
    a = hf(ids).logits[0, -1].float()
    from m1_basic.request import Sequence
    s = Sequence(-1, "x", prompt)
    llm.model_runner.allocate_kv_cache(s, 128)
    b = llm.model_runner.forward(s, 0)[-1]
print("last-logit max abs diff", (a - b).abs().max().item(), "scale", a.abs().max().item())
hf.generate(ids[:, :16], attention_mask=torch.ones_like(ids[:, :16]), max_new_tokens=8, do_sample=False)
for _ in range(3):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    o1 = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, min_new_tokens=1, do_sample=False)
    torch.cuda.synchronize(); t1 = time.perf_counter()
    o = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=128, min_new_tokens=128, do_sample=False)
    torch.cuda.synchronize(); t2 = time.perf_counter()
    print(f"hf TPOT ms: {((t2 - t1) - (t1 - t0)) / 127 * 1e3:.3f}  TTFT ms {(t1 - t0) * 1e3:.2f}")
match = sum(int(x == y) for x, y in zip(o[0, 128:].tolist(), out.token_ids))
print(f"token match m1 vs hf (bf16): {match}/128")
