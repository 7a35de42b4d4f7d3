"""Profile decode steps of a stage on the GPU: `python3 tools/profile_step.py m2_batching 16`.

A lead's tool for finding where a step's time goes (torch.profiler, top ops by time).
"""

import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

stage = importlib.import_module(sys.argv[1] if len(sys.argv) > 1 else "m2_batching")
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 16
model = sys.argv[3] if len(sys.argv) > 3 else "dummy:qwen2.5-0.5b"
llm = stage.LLM(model, device="cuda")
engine = llm.engine
g = torch.Generator().manual_seed(0)
for i in range(batch):
    prompt = torch.randint(3, 5000, (200,), generator=g).tolist()
    engine.add_request(f"r{i}", prompt, stage.SamplingParams(temperature=0, max_tokens=400,
                                                             ignore_eos=True))
times = []
for step in range(60):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
print(f"{sys.argv[1:]} step ms: first {times[0]*1e3:.1f}, then median "
      f"{sorted(times[5:])[len(times[5:]) // 2] * 1e3:.2f}")
from torch.profiler import ProfilerActivity, profile

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
