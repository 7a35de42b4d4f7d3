#!/usr/bin/env bash
# The lead's GPU acceptance run for issues 2-4, on the lent H100/H200 machine.
# The whole run outlasts one device command (m1 serves 64 long requests one at a time),
# so it starts in the background once and every call of this script waits up to
# WAIT seconds for it, then copies what is finished to $OUT. Call it again until DONE.
set -u
WORK=/tmp/acceptance
WAIT=${WAIT:-560}
if [ ! -d "$WORK" ]; then
  mkdir -p "$WORK/results"
  setsid nohup bash -c '
    export PYTHONUNBUFFERED=1
    cd "'"$PWD"'"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    echo "== gpu tests"; python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_paged.py 2>&1 | tail -5
    echo "== m1 run"; python3 -m m1_basic.run --model dummy:qwen2.5-0.5b --device cuda --max-tokens 16 2>&1 | tail -5
    for s in m2_batching m3_paged_kv; do
      echo "== $s run"; python3 -m $s.run --model dummy:qwen2.5-0.5b --device cuda --max-tokens 16 2>&1 | tail -6
    done
    echo "== latency"; python3 bench/compare.py --milestones m1,m2,m3,hf --workload latency \
      --model dummy:qwen2.5-0.5b --device cuda --input-len 128 --output-len 128 \
      --out-dir '"$WORK"'/results --no-progress 2>&1 | grep -v Warn
    echo "== throughput"; python3 bench/compare.py --milestones m1,m2,m3,hf --workload throughput \
      --num-prompts 64 --max-model-len 4096 --kv-cache-memory 805306368 \
      --model dummy:qwen2.5-0.5b --device cuda --out-dir '"$WORK"'/results --no-progress 2>&1 | grep -v Warn
    touch '"$WORK"'/DONE
  ' > "$WORK/log" 2>&1 < /dev/null &
  echo "started the acceptance run in the background"
fi
while [ ! -f "$WORK/DONE" ] && [ "$SECONDS" -lt "$WAIT" ]; do sleep 5; done
cp "$WORK/log" "$OUT/acceptance.log"
cp "$WORK"/results/*.json "$WORK"/results/*.png "$OUT/" 2>/dev/null
[ -f "$WORK/DONE" ] && echo DONE || echo "STILL RUNNING after ${SECONDS}s"
tail -c 6000 "$WORK/log"
