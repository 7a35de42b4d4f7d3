#!/usr/bin/env bash
# Issue 24 item 2 in one device call: 4-bit weights on a model where the lesson shows,
# dummy:llama-3.1-8b (Llama-3.1-8B's shapes, random weights), rows m7 (bf16) and
# m7:quantization=gptq (int4) in every part. Times on an H100 are estimates, not readings:
# an 8B row spends ~60 s starting (its 8.0e9 random weights are drawn on the CPU, ~40 s,
# so every device gets the same ones; then KV profiling and CUDA graphs).
#   lat8b   batch-1 TPOT: the latency workload, 4 prompts, 128 in / 128 out     ~150 s
#   budget  nano-vllm's workload (throughput: all at t=0, lengths uniform in [100, 1024]),
#           $PROMPTS (128) prompts, under --gpu-memory-gib $GIB (24): the KV tokens and
#           sequences at once that bf16 and int4 weights leave, and the tok/s    ~160 s
#   nano    the same workload at the default memory (gpu_memory_utilization 0.9) ~150 s
#   lat05   dummy:qwen2.5-0.5b, the lat8b rows, 2 repeats                       ~70 s
# A part that would end past $BUDGET_S (550) seconds after the start is skipped (the log
# names the call that runs it), and each part runs under `timeout` up to that mark, so the
# call ends before 570 s. The results JSON and the log go straight to $OUT as they are
# written (--no-plot: a call returns 8 files at most; draw a plot later on the CPU with
# `bench.compare.plot(json.load(open(F)), "F.png")`).
#   FOLOVLLM_GIT_COMMIT=<sha> FOLOVLLM_GIT_DIRTY=0 bash tools/gpu_bench_m7_8b.sh [parts...]
set -u
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0
fi
OUT=${OUT:-gpu-out}
BUDGET_S=${BUDGET_S:-550}
PROMPTS=${PROMPTS:-128}
GIB=${GIB:-24}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FOLOVLLM_BENCH_RESULTS="$OUT"
parts=${*:-"lat8b budget nano lat05"}
publish=""  # published results name a known, clean commit
if [ -n "${FOLOVLLM_GIT_COMMIT:-}" ] && [ "${FOLOVLLM_GIT_DIRTY:-}" = 0 ]; then publish=--publish; fi
common="--device cuda --no-progress --no-plot --out-dir $OUT $publish"
rows="m7,m7:quantization=gptq"
big="--model dummy:llama-3.1-8b"
declare -A need=([lat8b]=150 [budget]=160 [nano]=150 [lat05]=70)  # seconds, estimated
day=$(date -u +%Y%m%d)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9][0-9]*' | head -1 | tr 'H' 'h')

bench() {  # PART ARGS...: one compare.py run, skipped or cut at the time mark
  local part=$1 left
  shift
  left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt "${need[$part]}" ]; then
    echo "== $part skipped: ~${need[$part]} s needed, ${left} s left of ${BUDGET_S} s;" \
         "run it in another call: bash tools/gpu_bench_m7_8b.sh $part"
    return
  fi
  timeout --kill-after=15 "$left" python3 bench/compare.py "$@" $common
  echo "== $part ended with status $? at ${SECONDS} s"
}

{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
for part in $parts; do
  echo "== $part $(date -u +%H:%M:%S) (${SECONDS} s)"
  case $part in
    lat8b) bench lat8b --milestones "$rows" --workload latency --input-len 128 \
        --output-len 128 $big;;
    budget) bench budget --milestones "$rows" --workload throughput --num-prompts "$PROMPTS" \
        --gpu-memory-gib "$GIB" $big;;
    nano) bench nano --milestones "$rows" --workload throughput --num-prompts "$PROMPTS" $big;;
    lat05) bench lat05 --milestones "$rows" --workload latency --input-len 128 \
        --output-len 128 --repeat 2 --model dummy:qwen2.5-0.5b;;
    *) echo "unknown part $part: choose from lat8b budget nano lat05";;
  esac
done
echo "== end $(date -u +%H:%M:%S) (${SECONDS} s)"
} 2>&1 | grep --line-buffered -v Warn | tee "$OUT/gpu-bench-m7-8b-${gpu:-gpu}-$day.log"
