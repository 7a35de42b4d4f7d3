#!/usr/bin/env bash
# Issue 25 on a GPU in one device call (~100 s on an H100, an estimate): the server against
# the in-process bench, same stage, model, card and prompts. 1. bench/compare.py: $N prompts
# at once (the throughput workload, lengths $IN / $OUTLEN), then $LOW one at a time
# ($LOW_IN / $LOW_OUT). 2. `python -m serve` on a free port, a warm-up load (seed 1), then
# `python -m serve.load` with the bench's prompts: --request-rate inf ($N concurrent
# streams), and with --max-concurrency 1. 3. SIGTERM (the exit status is kept), then
# $OUT/serve-vs-bench-*.json: throughput ratio server / in-process (goal >= 0.9), the TTFT
# the server adds at low load (goal <= 5 ms), both sides' figures, commands, commit, card.
# Settings (environment, defaults): MODEL dummy:qwen2.5-0.5b, DEVICE cuda, STAGE m7, N 256,
# IN and OUTLEN 100:1024, LOW 16, LOW_IN and LOW_OUT 128, WARM 32, KV (KV cache bytes, both
# sides; default the engine's), PY python3, OUT. To try it on the CPU:
#   MODEL=dummy:tiny-llama DEVICE=cpu N=16 IN=16:32 OUTLEN=8:16 LOW=4 LOW_IN=16 LOW_OUT=8 \
#   WARM=4 KV=16777216 OUT=/tmp/serve-out bash tools/gpu_bench_serve.sh
# The GPU image lacks fastapi and uvicorn: carry .whl/ (installed here when needed), made
# with `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
# manylinux2014_x86_64 -d .whl` of constraints.txt's fastapi starlette pydantic
# pydantic-core uvicorn annotated-types annotated-doc typing-inspection typing-extensions
# opentelemetry-api anyio h11 click.
#   FOLOVLLM_GIT_COMMIT=<sha> FOLOVLLM_GIT_DIRTY=0 bash tools/gpu_bench_serve.sh
set -u
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0
fi
MODEL=${MODEL:-dummy:qwen2.5-0.5b} DEVICE=${DEVICE:-cuda} STAGE=${STAGE:-m7}
N=${N:-256} IN=${IN:-100:1024} OUTLEN=${OUTLEN:-100:1024} WARM=${WARM:-32}
LOW=${LOW:-16} LOW_IN=${LOW_IN:-128} LOW_OUT=${LOW_OUT:-128}
KV=${KV:-} PY=${PY:-python3} OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! "$PY" -c 'import fastapi, uvicorn' 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: fastapi and uvicorn are missing and there is no .whl/ to install (see --help)"
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
publish=""  # published results name a known, clean commit
if [ -n "${FOLOVLLM_GIT_COMMIT:-}" ] && [ "${FOLOVLLM_GIT_DIRTY:-}" = 0 ]; then publish=--publish; fi
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
card=${card:-cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')}
short=$(echo "$card" | grep -o 'H[0-9][0-9]*' | head -1 | tr 'H' 'h')
day=$(date -u +%Y%m%d)
slug=$(echo "$MODEL" | tr ':/' '--')
kv_bench=${KV:+--kv-cache-memory $KV}
kv_serve=${KV:+--kv-cache-memory $KV}
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url=http://127.0.0.1:$port
common=$(echo "--milestones $STAGE --model $MODEL --device $DEVICE --no-progress --no-plot" \
  $kv_bench $publish)
bench_streams="bench/compare.py $common --workload throughput --num-prompts $N --input-len $IN --output-len $OUTLEN --out-dir $OUT/inprocess-throughput"
bench_low="bench/compare.py $common --workload latency --num-prompts $LOW --input-len $LOW_IN --output-len $LOW_OUT --out-dir $OUT/inprocess-latency"
server=$(echo "-m serve --stage $STAGE --model $MODEL --device $DEVICE --port $port" $kv_serve)
load_streams="-m serve.load --url $url --num-prompts $N --request-rate inf --input-len $IN --output-len $OUTLEN --out $OUT/serve-load-streams.json"
load_low="-m serve.load --url $url --num-prompts $LOW --request-rate inf --max-concurrency 1 --input-len $LOW_IN --output-len $LOW_OUT --out $OUT/serve-load-one-at-a-time.json"
export CARD="$card" MODEL DEVICE STAGE N LOW OUT BENCH_STREAMS="$bench_streams" BENCH_LOW="$bench_low" \
  SERVER="$server" LOAD_STREAMS="$load_streams" LOAD_LOW="$load_low" \
  RESULT="$OUT/serve-vs-bench-$slug-$DEVICE-${short:-$DEVICE}-$day.json"

{
echo "== $card, $MODEL on $DEVICE, stage $STAGE $(date -u +%H:%M:%S)"
echo "== in-process: $N prompts at once, then $LOW one at a time"
# shellcheck disable=SC2086  # the commands are word lists
timeout 300 "$PY" $bench_streams || echo "== in-process throughput failed ($?)"
# shellcheck disable=SC2086
timeout 300 "$PY" $bench_low || echo "== in-process latency failed ($?)"

echo "== server on $url $(date -u +%H:%M:%S)"
# shellcheck disable=SC2086
"$PY" $server >"$OUT/server.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null' EXIT  # never leave it running
up=0
for _ in $(seq 600); do  # up to 300 s: load, KV profiling, CUDA graphs
  if ! kill -0 "$pid" 2>/dev/null; then break; fi
  if "$PY" -c "import urllib.request as u; u.urlopen('$url/health', timeout=2)" 2>/dev/null; then
    up=1; break
  fi
  sleep 0.5
done
if [ "$up" = 1 ]; then
  # warm-up (seed 1: other prompts): the shapes of both loads, as the bench warms its rows
  echo "== warm-up: $WARM requests at once, then 2 one at a time $(date -u +%H:%M:%S)"
  timeout 300 "$PY" -m serve.load --url "$url" --num-prompts "$WARM" --request-rate inf \
    --input-len "$IN" --output-len "$OUTLEN" --seed 1 >/dev/null
  timeout 300 "$PY" -m serve.load --url "$url" --num-prompts 2 --request-rate inf \
    --max-concurrency 1 --input-len "$LOW_IN" --output-len "$LOW_OUT" --seed 1 >/dev/null
  echo "== $N concurrent streams $(date -u +%H:%M:%S)"
  # shellcheck disable=SC2086
  timeout 300 "$PY" $load_streams || echo "== the streams load failed ($?)"
  echo "== one request at a time $(date -u +%H:%M:%S)"
  # shellcheck disable=SC2086
  timeout 300 "$PY" $load_low || echo "== the one-at-a-time load failed ($?)"
else
  echo "== the server did not come up; its log:"; tail -20 "$OUT/server.log"
fi
kill -TERM "$pid" 2>/dev/null
wait "$pid"
export SERVER_EXIT=$?
trap - EXIT
echo "== server stopped with status $SERVER_EXIT $(date -u +%H:%M:%S)"

"$PY" - <<'EOF'
"""Both sides' figures side by side, and the two ratios issue 25 asks for."""
import glob
import json
import os
import statistics
import time

from bench.compare import git_info

env = os.environ


def bench_row(folder):
    """The in-process row of the newest results file in OUT/folder, and its path."""
    files = sorted(glob.glob(os.path.join(env["OUT"], folder, "*.json")))
    if not files:
        return None, None
    return json.load(open(files[-1]))["rows"][0], os.path.relpath(files[-1], env["OUT"])


def load(name):
    """A serve.load --out file in OUT, and its name."""
    path = os.path.join(env["OUT"], name)
    return (json.load(open(path)), name) if os.path.exists(path) else (None, None)


def same_lengths(row, served):
    """Whether both sides generated the same number of tokens, request by request."""
    return ([s["output_len"] for s in row["samples"]]
            == [r["output_tokens"] for r in served["samples"]])


def ms(values):
    values = [1e3 * v for v in values]
    return {"p50": statistics.median(values), "mean": statistics.fmean(values),
            "n": len(values)} if values else None


streams_row, streams_file = bench_row("inprocess-throughput")
low_row, low_file = bench_row("inprocess-latency")
streams, streams_path = load("serve-load-streams.json")
low, low_path = load("serve-load-one-at-a-time.json")
commit, dirty = git_info()
out = {"issue": 25, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
       "card": env["CARD"], "model": env["MODEL"], "device": env["DEVICE"],
       "stage": env["STAGE"], "git_commit": commit, "git_dirty": dirty,
       "server_exit_status": int(env["SERVER_EXIT"]),
       "commands": {"inprocess_streams": f"python {env['BENCH_STREAMS']}",
                    "inprocess_low_load": f"python {env['BENCH_LOW']}",
                    "server": f"python {env['SERVER']}",
                    "server_streams": f"python {env['LOAD_STREAMS']}",
                    "server_low_load": f"python {env['LOAD_LOW']}"},
       "files": {"inprocess_streams": streams_file, "inprocess_low_load": low_file,
                 "server_streams": streams_path, "server_low_load": low_path}}
if streams_row and streams:
    mine, theirs = streams["summary"], streams_row["summary"]
    out["throughput"] = {
        "streams": int(env["N"]), "server_completed": mine["completed"],
        "same_output_lengths": same_lengths(streams_row, streams),
        "server_output_tok_per_s": mine["output_tok_per_s"],
        "inprocess_output_tok_per_s": theirs["output_tokens_per_s"],
        "ratio": mine["output_tok_per_s"] / theirs["output_tokens_per_s"], "goal": ">= 0.9",
        "server_itl_mean_ms": 1e3 * mine["itl_s"]["mean"] if mine["itl_s"] else None,
        "inprocess_itl_mean_ms": theirs["itl_mean_ms"]}
if low_row and low:
    server = ms([r["stamps"][0] for r in low["samples"] if not r["error"] and r["stamps"]])
    engine = ms([s["ttft_s"] for s in low_row["samples"] if s["ttft_s"] is not None])
    out["ttft_low_load"] = {
        "requests": int(env["LOW"]), "one_at_a_time": True,
        "same_output_lengths": same_lengths(low_row, low), "server_ttft_ms": server,
        "inprocess_ttft_ms": engine, "goal": "added p50 <= 5 ms",
        "added_ms": {k: server[k] - engine[k] for k in ("p50", "mean")}
        if server and engine else None}
json.dump(out, open(env["RESULT"], "w"), indent=1)
print(json.dumps({k: out.get(k) for k in ("throughput", "ttft_low_load",
                                          "server_exit_status")}, indent=1))
print(f"comparison: {env['RESULT']}")
EOF
echo "== end $(date -u +%H:%M:%S)"
} 2>&1 | grep --line-buffered -v Warn | tee "$OUT/gpu-bench-serve-${short:-$DEVICE}-$day.log"
