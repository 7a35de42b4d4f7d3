#!/usr/bin/env bash
# M4 on the lent GPU in one device call: the gpu-marked tests of the kernels, CUDA graphs
# and bf16 parity; the kernel benchmark; the step profile of m3 and m4 (graphs and
# eager); a latency bench of m3 and m4. Everything lands in $OUT (or ./gpu-out).
#   FOLOVLLM_GIT_COMMIT=<sha> bash tools/gpu_m4_check.sh [parts...]
# parts: tests kernels profile latency (default: all four)
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
parts=${*:-"tests kernels profile latency"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for part in $parts; do
  echo "== $part $(date -u +%H:%M:%S)"
  case $part in
    tests)
      python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_triton_kernels.py \
        tests/test_fused_ops.py tests/test_flash_attn.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
      python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -k m4 2>&1 \
        | tail -8 | tee -a "$OUT/tests.txt";;
    kernels)
      python3 bench/attention_kernels.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt";;
    profile)
      python3 tools/profile_step.py --stages m3_paged_kv,m4_flash_attn --m4-eager \
        --batches 1,64,256 --out "$OUT/profile.json" 2>&1 | tee "$OUT/profile.txt";;
    latency)
      python3 bench/compare.py --milestones m3,m4 --workload latency --input-len 128 \
        --output-len 128 --model dummy:qwen2.5-0.5b --device cuda --no-progress \
        --out-dir "$OUT" --no-plot 2>&1 | grep -v Warn | tee "$OUT/latency.txt";;
  esac
done
echo "== end $(date -u +%H:%M:%S)"
