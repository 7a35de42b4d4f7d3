"""The benchmark harness: every stage (and transformers) on the same workload.

Introduced with M1 (the first stage that generates). `bench/compare.py` is the command
line; `bench/worker.py` runs one stage in its own process; `bench/workloads.py` builds the
prompts; `bench/roofline.py` measures the GPU and computes the workload's lower bound;
`bench/report.py` reads results files and renders their tables (the docs use it).
"""
