#!/usr/bin/env bash
# M6's GPU work (an H100 or H200), all bf16 on dummy:qwen2.5-0.5b, rows $ROWS (default
# m5,m6; e.g. ROWS=m5,m6,m6:enable_prefix_caching=false adds the cache-off row):
#   tests       the gpu-marked tests of M6 and the prefix cache (pytest -k "m6 or prefix")
#   prefix      the prefix workload (32 prompts: a shared prefix + 32-token questions, 64
#               out) with a 512-token and a 2048-token prefix, $REPEAT runs per row
#   throughput  nano-vllm's offline workload (throughput, 256 prompts, 100-1024 in/out),
#               $REPEAT runs per row
#   chat        the multi-turn chat workload at its defaults (16 conversations x 4 turns:
#               a 256-token first prompt, 64-token user messages, 128 out per turn),
#               $REPEAT runs per row
# Each part should take a few minutes; run one or two per device call (each compare run
# is cut at PART_TIMEOUT seconds, default 540). Files go to $RESULTS (outside the synced
# tree, so they survive the next call on a warm machine) with --publish, and after every
# part into $OUT/m6-results.tar, ready to copy into bench/results/.
# The GPU copy has no usable .git: pass FOLOVLLM_GIT_COMMIT (and FOLOVLLM_GIT_DIRTY).
#   FOLOVLLM_GIT_COMMIT=<sha> FOLOVLLM_GIT_DIRTY=1 bash tools/gpu_bench_m6.sh [parts...]
set -u
RESULTS=${RESULTS:-/tmp/m6-results}
OUT=${OUT:-gpu-out}
ROWS=${ROWS:-m5,m6}
REPEAT=${REPEAT:-3}
PART_TIMEOUT=${PART_TIMEOUT:-540}
mkdir -p "$RESULTS" "$OUT"
export PYTHONUNBUFFERED=1 FOLOVLLM_BENCH_RESULTS="$RESULTS"
parts=${*:-"tests prefix throughput chat"}
common="--model dummy:qwen2.5-0.5b --device cuda --publish --no-progress"
day=$(date -u +%Y%m%d)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9][0-9]*' | head -1 | tr 'H' 'h')
compare() { timeout "$PART_TIMEOUT" python3 bench/compare.py --milestones "$ROWS" "$@" $common; }
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
for part in $parts; do
  echo "== $part $(date -u +%H:%M:%S)"
  case $part in
    tests) timeout "$PART_TIMEOUT" python3 -m pytest -q -m gpu -p no:cacheprovider \
        -k "m6 or prefix" tests/ 2>&1 | tail -15;;
    prefix) for len in 512 2048; do
        compare --workload prefix --prefix-len "$len" --repeat "$REPEAT"; done;;
    throughput) compare --workload throughput --num-prompts 256 --repeat "$REPEAT";;
    chat) compare --workload chat --repeat "$REPEAT";;
    *) echo "unknown part $part: choose from tests prefix throughput chat";;
  esac 2>&1 | grep -v Warn
  tar -C "$RESULTS" -cf "$OUT/m6-results.tar" .
done
echo "== end $(date -u +%H:%M:%S)"
} 2>&1 | tee "$RESULTS/gpu-bench-m6-${gpu:-gpu}-$day-$(date -u +%H%M%S).log"
tar -C "$RESULTS" -cf "$OUT/m6-results.tar" .
