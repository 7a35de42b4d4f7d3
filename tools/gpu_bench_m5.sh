#!/usr/bin/env bash
# M5's GPU work (an H100 or H200), all bf16, in one or two device calls:
#   tests     the gpu-marked tests of M5 (unified attention at real shapes, graphs = eager
#             on mixed steps) and bf16 parity with transformers
#   capacity  throughput of m4 and m5 on the long-prompt workload (1000-4000 in, 128-512
#             out): the request rate each sustains, to choose the online rate from
#   online    the long-prompt online workload at each of RATES (env, requests/s, default
#             "10 14"): m4, m5, m5 with a 4096-token budget, m5 with chunked prefill off
#   nano      throughput, dummy:qwen3-0.6b, 256 prompts (nano-vllm's workload): m4, m5
#   memory    peak activation memory of one 16384-token prompt: m4, m5
#   profile   decode steps (batch 1, 64, 256) of m4 and m5, graphs and eager
#   mixed     mixed steps of m5 (16 or 64 decodes + a chunk, budget 512, dummy:qwen3-0.6b):
#             CUDA graphs against eager
# Files go to $RESULTS (outside the synced tree), then into $OUT/m5-results.tar.
# The GPU copy has no usable .git: pass FOLOVLLM_GIT_COMMIT (and FOLOVLLM_GIT_DIRTY).
#   FOLOVLLM_GIT_COMMIT=<sha> RATES="10 14" bash tools/gpu_bench_m5.sh [parts...]
set -u
RESULTS=${RESULTS:-/tmp/m5-results}
OUT=${OUT:-gpu-out}
RATES=${RATES:-"10 14"}
mkdir -p "$RESULTS" "$OUT"
export PYTHONUNBUFFERED=1 FOLOVLLM_BENCH_RESULTS="$RESULTS"
parts=${*:-"tests capacity online nano memory profile mixed"}
common="--device cuda --publish --no-progress"
long="--input-len 1000:4000 --output-len 128:512 --max-model-len 4608 --model dummy:qwen3-0.6b"
day=$(date -u +%Y%m%d)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9][0-9]*' | head -1 | tr 'H' 'h')
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
for part in $parts; do
  echo "== $part $(date -u +%H:%M:%S)"
  case $part in
    tests)
      python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_chunked_prefill.py \
        tests/test_flash_attn.py 2>&1 | tail -15
      python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -k "m4 or m5" 2>&1 \
        | tail -8;;
    capacity) python3 bench/compare.py --milestones m4,m5 --workload throughput \
        --num-prompts 200 $long $common;;
    online) for rate in $RATES; do
        python3 bench/compare.py --workload online --request-rate "$rate" --num-prompts 200 \
          --milestones m4,m5,m5:max_num_batched_tokens=4096,m5:enable_chunked_prefill=false \
          $long $common; done;;
    nano) python3 bench/compare.py --milestones m4,m5 --workload throughput \
        --model dummy:qwen3-0.6b $common;;
    memory) python3 tools/activation_memory.py --stages m4,m5 --graphs \
        --model dummy:qwen3-0.6b --prompt-len 16384 \
        --out "$RESULTS/activation-memory-dummy-qwen3-0.6b-cuda-${gpu:-gpu}-$day.json";;
    profile)
      python3 tools/profile_step.py --stages m4_flash_attn,m5_chunked_prefill --m4-eager \
        --batches 1,64,256 --model dummy:qwen2.5-0.5b \
        --out "$RESULTS/profile-dummy-qwen2.5-0.5b-cuda-${gpu:-gpu}-$day.json";;
    mixed) python3 tools/profile_step.py --stages m5_chunked_prefill --m4-eager --batches 16,64 \
        --mixed-budget 512 --steps 10 --model dummy:qwen3-0.6b \
        --out "$RESULTS/profile-mixed-dummy-qwen3-0.6b-cuda-${gpu:-gpu}-$day.json";;
  esac
done 2>&1 | grep -v Warn
echo "== end $(date -u +%H:%M:%S)"
} 2>&1 | tee "$RESULTS/gpu-bench-m5-${gpu:-gpu}-$day.log"
tar -C "$RESULTS" -cf "$OUT/m5-results.tar" .
