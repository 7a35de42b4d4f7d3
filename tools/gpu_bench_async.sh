#!/usr/bin/env bash
# Async scheduling on a GPU, in one device call (about 9 minutes on an H100 or H200):
#   tests     the gpu-marked tests of async scheduling, the fused and attention kernels, the
#             GPTQ kernels, and bf16 parity with transformers for M4 and M7
#   check     tools/gpu_async_check.py: parity (fp32) and tokens/s off and on, M4-M7
#   latency   dummy:qwen2.5-0.5b, 128 in / 128 out, 3 repeats: m3, m4 and m7 off and on, hf
#   nano      nano-vllm's workload (dummy:qwen3-0.6b, 256 prompts): m4 and m7 off and on
#   profile   (not in the default list: a second call) tools/profile_step.py, m4 and m7 off
#             and on, batches 1, 64, 256: wall, steady (back to back), CPU and GPU ms
# Files go to $RESULTS (the tests' junit XML too), then into $OUT/async-results.tar after
# each part, with the log so far: a call cut short keeps the parts it finished.
#   FOLOVLLM_GIT_COMMIT=<sha> FOLOVLLM_GIT_DIRTY=0 bash tools/gpu_bench_async.sh [parts...]
set -u
RESULTS=${RESULTS:-/tmp/async-results}
OUT=${OUT:-gpu-out}
mkdir -p "$RESULTS" "$OUT"
export PYTHONUNBUFFERED=1 FOLOVLLM_BENCH_RESULTS="$RESULTS"
parts=${*:-"tests check latency nano"}
common="--device cuda --publish --no-progress"
on=async_scheduling=true
day=$(date -u +%Y%m%d)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9][0-9]*' | head -1 | tr 'H' 'h')
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
for part in $parts; do
  echo "== $part $(date -u +%H:%M:%S)"
  case $part in
    tests) python3 -m pytest -q -m gpu tests/test_async_scheduling.py tests/test_fused_ops.py \
        tests/test_triton_kernels.py tests/test_gptq_kernels.py tests/test_gpu.py \
        -k "not bf16_cuda_parity or m4_flash_attn or m7_gptq" -p no:cacheprovider -rfE \
        --junitxml "$RESULTS/gpu-tests-${gpu:-gpu}-$day.xml";;
    check) python3 tools/gpu_async_check.py \
        --stages m4_flash_attn,m5_chunked_prefill,m6_prefix_cache,m7_gptq \
        --out "$RESULTS/async-check-${gpu:-gpu}-$day.json";;
    latency) python3 bench/compare.py --milestones "m3,m4,m4:$on,m7,m7:$on,hf" \
        --workload latency --input-len 128 --output-len 128 --repeat 3 \
        --model dummy:qwen2.5-0.5b $common;;
    nano) python3 bench/compare.py --milestones "m4,m4:$on,m7,m7:$on" --workload throughput \
        --model dummy:qwen3-0.6b $common;;
    profile) python3 tools/profile_step.py --stages m4,m4:async,m7,m7:async \
        --batches 1,64,256 --model dummy:qwen2.5-0.5b \
        --out "$RESULTS/profile-async-dummy-qwen2.5-0.5b-cuda-${gpu:-gpu}-$day.json";;
    *) echo "unknown part $part: choose from tests check latency nano profile";;
  esac
  tar -C "$RESULTS" -cf "$OUT/async-results.tar" .
done 2>&1 | grep --line-buffered -v Warn
echo "== end $(date -u +%H:%M:%S)"
} 2>&1 | tee "$RESULTS/gpu-bench-async-${gpu:-gpu}-$day.log"
tar -C "$RESULTS" -cf "$OUT/async-results.tar" .
