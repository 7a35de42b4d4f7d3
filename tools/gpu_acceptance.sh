#!/usr/bin/env bash
# The GPU acceptance run, on the lent H100/H200 machine: the gpu-marked tests, each
# generating stage's smoke check against transformers, a profile of an m3 step, and the
# throughput ladder m1..m3 (+ transformers). The whole run outlasts one device command
# (m1 serves 64 long requests one at a time), so the first call starts it in the
# background and every call waits up to WAIT seconds, then copies what is finished to
# $OUT. Call it again until it prints DONE. The copy on the GPU machine has no .git:
# pass the commit it was made from as FOLOVLLM_GIT_COMMIT (the bench records it).
# SKIP_SMOKE=1 leaves out the smoke checks and the profile (a rerun of the ladder only).
set -u
WORK=/tmp/acceptance
WAIT=${WAIT:-560}
if [ ! -d "$WORK" ]; then
  mkdir -p "$WORK/results"
  setsid nohup bash -c '
    export PYTHONUNBUFFERED=1
    cd "'"$PWD"'"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    echo "== gpu tests"; python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tail -8
    if [ -z "'"${SKIP_SMOKE:-}"'" ]; then
      for s in m1 m2 m3; do
        echo "== smoke $s"; python3 tools/gpu_smoke.py $s 2>&1 | grep -v Warn | tail -9
      done
      echo "== profile m3, batch 64"; python3 tools/profile_step.py m3_paged_kv 64 2>&1 | head -24
    fi
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
