#!/usr/bin/env bash
# M7's W4A16 kernels on a GPU (an H100 or H200), in one device call of a few minutes:
#   tests    the gpu-marked tests of tests/test_gptq_kernels.py: bf16 against the fp32
#            reference at qwen2.5-0.5b's and llama-3.1-8b's shapes, every path, CUDA graphs
#   kernels  tools/bench_gptq_kernels.py, both shape sets (qwen2.5-0.5b, llama-3.1-8b), at
#            M = 1, 16, 64, 256: the 4-bit kernel against bf16 torch.matmul, layer sums, TB/s
#   batch    llama-3.1-8b at M = 1, 2, 4, ..., 256 (bf16 and 4-bit against batch size, with
#            the card's roofline: the M7 page's picture of where 4 bits pay)
#   sweep    (not in the default list: a call of its own) --sweep on llama-3.1-8b at M = 1
#            and 16: which launch settings the kernels should keep
# Every file is written straight into $OUT as it goes (the log line by line, a part's JSON
# or junit XML when it ends), so a call cut at its time limit still brings back what its
# finished parts wrote. Each part is cut at PART_TIMEOUT seconds (default 240). KERNEL_ARGS
# adds options to the benchmark (e.g. --interpret-smoke, to check this script on a CPU).
# The GPU copy has no usable .git: pass FOLOVLLM_GIT_COMMIT (and FOLOVLLM_GIT_DIRTY).
#   FOLOVLLM_GIT_COMMIT=<sha> FOLOVLLM_GIT_DIRTY=0 bash tools/gpu_bench_gptq.sh [parts...]
set -u
OUT=${OUT:-gpu-out}
PART_TIMEOUT=${PART_TIMEOUT:-240}
KERNEL_ARGS=${KERNEL_ARGS:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
parts=${*:-"tests kernels batch"}
stamp=$(date -u +%Y%m%d-%H%M%S)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 \
  | grep -o 'H[0-9][0-9]*' | head -1 | tr 'H' 'h')
gpu=${gpu:-gpu}
bench() { timeout "$PART_TIMEOUT" python3 tools/bench_gptq_kernels.py $KERNEL_ARGS "$@"; }
{
echo "commit ${FOLOVLLM_GIT_COMMIT:-unset} dirty ${FOLOVLLM_GIT_DIRTY:-unset}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
for part in $parts; do
  echo "== $part $(date -u +%H:%M:%S)"
  case $part in
    tests) timeout "$PART_TIMEOUT" python3 -m pytest -q -m gpu tests/test_gptq_kernels.py \
        -p no:cacheprovider -rfE --junitxml "$OUT/gptq-gpu-tests-$gpu-$stamp.xml";;
    kernels) bench --shapes qwen2.5-0.5b,llama-3.1-8b --out "$OUT/gptq-kernels-$gpu-$stamp.json";;
    batch) bench --shapes llama-3.1-8b --rows 1,2,4,8,16,32,64,128,256 \
        --out "$OUT/gptq-batch-$gpu-$stamp.json";;
    sweep) bench --shapes llama-3.1-8b --rows 1,16 --sweep \
        --out "$OUT/gptq-kernels-sweep-$gpu-$stamp.json";;
    *) echo "unknown part $part: choose from tests kernels batch sweep"; false;;
  esac
  echo "== $part exit $? $(date -u +%H:%M:%S)"
done 2>&1 | grep --line-buffered -v Warn
echo "== end $(date -u +%H:%M:%S)"
} 2>&1 | tee "$OUT/gpu-bench-gptq-$gpu-$stamp.log"
