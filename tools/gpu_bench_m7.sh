#!/usr/bin/env bash
# M7's GPU work (an H100 or H200), bf16 activations on dummy:qwen2.5-0.5b; the int4 rows
# round the dummy weights to 4 bits (groups of 64) at load (speed does not depend on the
# values). Rows $ROWS (default m7,m7:quantization=gptq). Parts:
#   tests       the gpu-marked tests of M7 and the GPTQ kernels (pytest -k "m7 or gptq")
#   kernels     tools/bench_gptq_kernels.py (W4A16 vs bf16 torch.matmul at M = 1..256);
#               KERNEL_ARGS adds options (e.g. --sweep)
#   latency     one request at a time, 128 in / 128 out, $REPEAT runs per row
#   throughput  nano-vllm's offline workload (256 prompts, 100-1024 in/out), $REPEAT runs
#   profile     tools/profile_step.py: decode steps of m7 and m7:gptq at batch 1, 64, 256
#   full        every stage on the same small workloads ("the full engine" table):
#               latency (1 request, 128/128) and throughput (16 prompts, 128/128),
#               rows m1..m7 and m7:quantization=gptq
# Each compare run is cut at PART_TIMEOUT seconds (default 540). Files go to $RESULTS
# (outside the synced tree, so they survive the next call on a warm machine) with
# --publish, and after every part into $OUT/m7-results.tar, ready for bench/results/.
# The GPU copy has no usable .git: pass FOLOVLLM_GIT_COMMIT (and FOLOVLLM_GIT_DIRTY).
#   FOLOVLLM_GIT_COMMIT=<sha> FOLOVLLM_GIT_DIRTY=1 bash tools/gpu_bench_m7.sh [parts...]
set -u
RESULTS=${RESULTS:-/tmp/m7-results}
OUT=${OUT:-gpu-out}
ROWS=${ROWS:-m7,m7:quantization=gptq}
REPEAT=${REPEAT:-3}
PART_TIMEOUT=${PART_TIMEOUT:-540}
KERNEL_ARGS=${KERNEL_ARGS:-}
mkdir -p "$RESULTS" "$OUT"
export PYTHONUNBUFFERED=1 FOLOVLLM_BENCH_RESULTS="$RESULTS"
parts=${*:-"tests kernels latency throughput"}
common="--model dummy:qwen2.5-0.5b --device cuda --publish --no-progress"
day=$(date -u +%Y%m%d)
stamp=$(date -u +%Y%m%d-%H%M%S)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9][0-9]*' | head -1 | tr 'H' 'h')
compare() { timeout "$PART_TIMEOUT" python3 bench/compare.py "$@" $common; }
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
for part in $parts; do
  echo "== $part $(date -u +%H:%M:%S)"
  case $part in
    tests) timeout "$PART_TIMEOUT" python3 -m pytest -q -m gpu -p no:cacheprovider \
        -k "m7 or gptq" tests/ 2>&1 | tail -15;;
    kernels) timeout "$PART_TIMEOUT" python3 tools/bench_gptq_kernels.py $KERNEL_ARGS \
        --out "$RESULTS/gptq-kernels-${gpu:-gpu}-$stamp.json";;
    latency) compare --milestones "$ROWS" --workload latency --input-len 128 \
        --output-len 128 --repeat "$REPEAT";;
    throughput) compare --milestones "$ROWS" --workload throughput --num-prompts 256 \
        --repeat "$REPEAT";;
    profile) timeout "$PART_TIMEOUT" python3 tools/profile_step.py --stages m7,m7:gptq \
        --batches 1,64,256 --model dummy:qwen2.5-0.5b \
        --out "$RESULTS/profile-m7-dummy-qwen2.5-0.5b-cuda-${gpu:-gpu}-$day.json";;
    full) all=m1,m2,m3,m4,m5,m6,m7,m7:quantization=gptq
      compare --milestones "$all" --workload latency --input-len 128 --output-len 128
      compare --milestones "$all" --workload throughput --num-prompts 16 --input-len 128 \
        --output-len 128;;
    *) echo "unknown part $part: choose from tests kernels latency throughput profile full";;
  esac 2>&1 | grep -v Warn
  tar -C "$RESULTS" -cf "$OUT/m7-results.tar" .
done
echo "== end $(date -u +%H:%M:%S)"
} 2>&1 | tee "$RESULTS/gpu-bench-m7-${gpu:-gpu}-$stamp.log"
tar -C "$RESULTS" -cf "$OUT/m7-results.tar" .
