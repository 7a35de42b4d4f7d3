#!/usr/bin/env bash
# The published GPU bench set: the runs whose tables the docs pages show, on the lent
# H100/H200 machine, all on dummy:qwen2.5-0.5b in bf16 with --publish. The files go to
# $WORK/results (FOLOVLLM_BENCH_RESULTS), outside the tree: each device call syncs the
# working tree again, which removes files the session's own tree does not have.
#   concurrent (the default workload) and latency, 3 repeats each; online; throughput
#   with 64 prompts and a 768 MiB KV budget for every stage (m1 serves its 64 long
#   requests one at a time: about 15 minutes on an H100).
# The whole set outlasts one device command, so the first call starts it in the
# background and every call waits up to WAIT seconds, then packs what is finished into
# $OUT/bench-set.tar (results files, plots, the log). Call it again until it prints DONE.
# The copy on the GPU machine has no usable .git: pass the commit the tree was made from
# as FOLOVLLM_GIT_COMMIT (and FOLOVLLM_GIT_DIRTY=1 if it had uncommitted changes).
# ONLY="concurrent latency" runs a subset.
set -u
WORK=/tmp/bench-set
WAIT=${WAIT:-560}
ONLY=${ONLY:-"concurrent latency online throughput"}
if [ ! -d "$WORK" ]; then
  mkdir -p "$WORK/results"
  setsid nohup bash -c '
    export PYTHONUNBUFFERED=1 FOLOVLLM_BENCH_RESULTS="'"$WORK"'/results"
    cd "'"$PWD"'"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    common="--model dummy:qwen2.5-0.5b --device cuda --publish --no-progress"
    for w in '"$ONLY"'; do
      echo "== $w $(date -u +%H:%M:%S)"
      case $w in
        concurrent) args="--repeat 3";;
        latency) args="--workload latency --repeat 3";;
        online) args="--workload online";;
        throughput) args="--workload throughput --num-prompts 64 --max-model-len 4096 --kv-cache-memory 768MiB";;
      esac
      python3 bench/compare.py --milestones m1,m2,m3,hf $args $common 2>&1 | grep -v Warn
    done
    echo "== end $(date -u +%H:%M:%S)"
    touch '"$WORK"'/DONE
  ' > "$WORK/log" 2>&1 < /dev/null &
  echo "started the bench set in the background"
fi
while [ ! -f "$WORK/DONE" ] && [ "$SECONDS" -lt "$WAIT" ]; do sleep 5; done
cp "$WORK/log" "$WORK/results/bench-set.log"
tar -cf "$OUT/bench-set.tar" -C "$WORK/results" .
[ -f "$WORK/DONE" ] && echo DONE || echo "STILL RUNNING after ${SECONDS}s"
tail -c 5000 "$WORK/log"
