#!/usr/bin/env bash
# Before and after a change, on one card: the same bench/compare.py runs on two trees,
# one after the other on the same machine: BEFORE (a `git archive` of the base commit,
# e.g. in build/before, carried to the GPU machine) and this tree. Bf16 on
# dummy:qwen2.5-0.5b with --publish; the files go to $RESULTS/before and $RESULTS/after,
# and after each part into $OUT/before-after.tar. Parts:
#   latency     one request at a time, 128 in / 128 out, $REPEAT runs per row
#   throughput  nano-vllm's offline workload (256 prompts, 100-1024 in/out), $REPEAT runs
# Rows: $ROWS on the base tree (default m4,m5,m6,m7,m7:quantization=gptq) and $AFTER_ROWS
# on this one (default the same; e.g. with m3 and hf added, for the pages that compare
# with them). SIDES="before after" (the default) runs both, one side alone when the
# parts do not fit one device call (run the others on the same warm machine).
# The GPU copy has no usable .git: name both commits.
#   BEFORE=build/before BEFORE_COMMIT=<sha> FOLOVLLM_GIT_COMMIT=<sha> FOLOVLLM_GIT_DIRTY=0 \
#     bash tools/gpu_bench_before_after.sh latency throughput
set -u
RESULTS=${RESULTS:-/tmp/before-after}
OUT=${OUT:-gpu-out}
ROWS=${ROWS:-m4,m5,m6,m7,m7:quantization=gptq}
AFTER_ROWS=${AFTER_ROWS:-$ROWS}
SIDES=${SIDES:-"before after"}
REPEAT=${REPEAT:-3}
PART_TIMEOUT=${PART_TIMEOUT:-540}
: "${BEFORE:?set BEFORE to the base commit tree}" "${BEFORE_COMMIT:?set BEFORE_COMMIT}"
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
  for side in $SIDES; do
    echo "== $part, $side $(date -u +%H:%M:%S)"
    if [ "$side" = before ]; then
      (cd "$BEFORE" && FOLOVLLM_GIT_COMMIT=$BEFORE_COMMIT FOLOVLLM_GIT_DIRTY=0 \
        FOLOVLLM_BENCH_RESULTS="$RESULTS/before" timeout "$PART_TIMEOUT" \
        python3 bench/compare.py --milestones "$ROWS" $args $common)
    else
      FOLOVLLM_BENCH_RESULTS="$RESULTS/after" timeout "$PART_TIMEOUT" \
        python3 bench/compare.py --milestones "$AFTER_ROWS" $args $common
    fi 2>&1 | grep -v Warn
  done
  tar -C "$RESULTS" -cf "$OUT/before-after.tar" .
done
echo "== end $(date -u +%H:%M:%S)"
