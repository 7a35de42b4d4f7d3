#!/usr/bin/env bash
# M4's published GPU results (about 10 minutes on an H100 or H200; two calls), all bf16:
#   throughput, dummy:qwen2.5-0.5b, 64 prompts, 768 MiB of KV cache: m3, m4
#   throughput, dummy:qwen3-0.6b, 256 prompts (nano-vllm's offline workload): m3, m4
#   latency, dummy:qwen2.5-0.5b, 128 in / 128 out, 3 repeats: m3, m4, hf
#   the kernel benchmark (bench/attention_kernels.py) and the step profile (tools/profile_step.py)
# Files go to $RESULTS (outside the synced tree), then into $OUT/m4-results.tar.
# The GPU copy has no usable .git: pass FOLOVLLM_GIT_COMMIT (and FOLOVLLM_GIT_DIRTY).
#   FOLOVLLM_GIT_COMMIT=<sha> bash tools/gpu_bench_m4.sh [parts...]
# parts: throughput nano latency kernels profile (default: all)
set -u
RESULTS=${RESULTS:-/tmp/m4-results}
OUT=${OUT:-gpu-out}
mkdir -p "$RESULTS" "$OUT"
export PYTHONUNBUFFERED=1 FOLOVLLM_BENCH_RESULTS="$RESULTS"
parts=${*:-"throughput nano latency kernels profile"}
common="--device cuda --publish --no-progress"
day=$(date -u +%Y%m%d)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9][0-9]*' | head -1 | tr 'H' 'h')
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
for part in $parts; do
  echo "== $part $(date -u +%H:%M:%S)"
  case $part in
    throughput) python3 bench/compare.py --milestones m3,m4 --workload throughput \
        --num-prompts 64 --kv-cache-memory 805306368 --model dummy:qwen2.5-0.5b $common;;
    nano) python3 bench/compare.py --milestones m3,m4 --workload throughput \
        --model dummy:qwen3-0.6b $common;;
    latency) python3 bench/compare.py --milestones m3,m4,hf --workload latency \
        --input-len 128 --output-len 128 --repeat 3 --model dummy:qwen2.5-0.5b $common;;
    kernels) python3 bench/attention_kernels.py --out "$RESULTS/kernels-${gpu:-gpu}-$day.json";;
    profile) python3 tools/profile_step.py --stages m3_paged_kv,m4_flash_attn --m4-eager \
        --batches 1,64,256 --model dummy:qwen2.5-0.5b \
        --out "$RESULTS/profile-dummy-qwen2.5-0.5b-cuda-${gpu:-gpu}-$day.json";;
  esac
done 2>&1 | grep -v Warn
echo "== end $(date -u +%H:%M:%S)"
} 2>&1 | tee "$RESULTS/gpu-bench-m4-${gpu:-gpu}-$day.log"
tar -C "$RESULTS" -cf "$OUT/m4-results.tar" .
