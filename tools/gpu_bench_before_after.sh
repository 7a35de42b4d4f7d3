#!/usr/bin/env bash
# Before and after a change, on one card: the same bench/compare.py runs on two trees,
# one after the other on the same machine: BEFORE (a `git archive` of the base commit,
# e.g. in build/before, carried to the GPU machine) and this tree. Bf16 on
# dummy:qwen2.5-0.5b with --publish; the files go to $RESULTS/before and $RESULTS/after,
# and after each part into $OUT/before-after.tar. Parts:
#   latency     one request at a time, 128 in / 128 out, $REPEAT runs per row
#   throughput  nano-vllm's offline workload (256 prompts, 100-1024 in/out), $REPEAT runs
# Rows: $ROWS on both trees (default m4,m5,m6,m7,m7:quantization=gptq), and $EXTRA_ROWS
# added to the after tree's run (e.g. m3,hf, for the pages that compare with them).
# The GPU copy has no usable .git: name both commits.
#   BEFORE=build/before BEFORE_COMMIT=<sha> FOLOVLLM_GIT_COMMIT=<sha> FOLOVLLM_GIT_DIRTY=0 \
#     bash tools/gpu_bench_before_after.sh latency throughput
set -u
RESULTS=${RESULTS:-/tmp/before-after}
OUT=${OUT:-gpu-out}
ROWS=${ROWS:-m4,m5,m6,m7,m7:quantization=gptq}
EXTRA_ROWS=${EXTRA_ROWS:-}
REPEAT=${REPEAT:-3}
PART_TIMEOUT=${PART_TIMEOUT:-540}
: "${BEFORE:?set BEFORE to the base commit's tree}" "${BEFORE_COMMIT:?set BEFORE_COMMIT}"
mkdir -p "$RESULTS/before" "$RESULTS/after" "$OUT"
export PYTHONUNBUFFERED=1
common="--model dummy:qwen2.5-0.5b --device cuda --publish --no-progress"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
for part in "$@"; do
  case $part in
    latency) args="--workload latency --input-len 128 --output-len 128 --repeat $REPEAT";;
    throughput) args="--workload throughput --num-prompts 256 --repeat $REPEAT";;
    *) echo "unknown part $part: choose from latency throughput"; continue;;
  esac
  echo "== $part, before ($BEFORE_COMMIT) $(date -u +%H:%M:%S)"
  (cd "$BEFORE" && FOLOVLLM_GIT_COMMIT=$BEFORE_COMMIT FOLOVLLM_GIT_DIRTY=0 \
    FOLOVLLM_BENCH_RESULTS="$RESULTS/before" timeout "$PART_TIMEOUT" \
    python3 bench/compare.py --milestones "$ROWS" $args $common) 2>&1 | grep -v Warn
  echo "== $part, after ($FOLOVLLM_GIT_COMMIT) $(date -u +%H:%M:%S)"
  FOLOVLLM_BENCH_RESULTS="$RESULTS/after" timeout "$PART_TIMEOUT" \
    python3 bench/compare.py --milestones "${EXTRA_ROWS:+$EXTRA_ROWS,}$ROWS" $args $common \
    2>&1 | grep -v Warn
  tar -C "$RESULTS" -cf "$OUT/before-after.tar" .
done
echo "== end $(date -u +%H:%M:%S)"
