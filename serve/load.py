"""`python -m serve.load`: drive a running server over HTTP as the bench drives an engine.

The requests are the bench's workloads (`bench/workloads.py`: random token-id prompts
from a seed, greedy, `ignore_eos`): `online` (Poisson arrivals at `--request-rate`), or
with `--request-rate inf` `throughput` (all at once: the prompts of `bench/compare.py
--workload throughput` with the same seed, counts and lengths). `--max-concurrency N`
keeps at most N in flight (N = 1: one at a time, like the `latency` workload). Each
request streams on its own connection; the report gives TTFT, ITL and end-to-end
percentiles and the request and token throughput; `--out FILE.json` keeps the samples.

    python -m serve.load --url http://127.0.0.1:8000 --num-prompts 64 --request-rate 4
    python -m serve.load --num-prompts 256 --request-rate inf   # 256 concurrent streams

Introduced after M7 (issue 25).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import statistics
import sys
import threading
import time
from urllib.parse import urlparse

from bench.compare import parse_length
from bench.workloads import build_workload


def model_card(url: str) -> dict:
    """The server's one model: its id, vocabulary size and longest sequence."""
    status, body = _get(url, "/v1/models")
    if status != 200:
        raise SystemExit(f"error: GET {url}/v1/models answered {status}")
    return body["data"][0]


def _get(url: str, path: str) -> tuple[int, dict]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    except OSError as exc:
        raise SystemExit(f"error: cannot reach {url}: {exc}") from None
    finally:
        conn.close()


def stream_one(url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    """Send one streaming completion; its times (from the moment it was sent) and tokens."""
    u = urlparse(url)
    body = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                ignore_eos=True, stream=True, stream_options={"include_usage": True})
    start = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)
    stamps, tokens, error = [], 0, None
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            error = f"{response.status}: {response.read()[:200]!r}"
        while error is None and (line := response.readline()):
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                stamps.append(time.perf_counter() - start)
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    except OSError as exc:
        error = str(exc)
    finally:
        conn.close()
    return dict(stamps=stamps, output_tokens=tokens, error=error,
                e2e_s=time.perf_counter() - start)


def run(url: str, model: str, workload,
        max_concurrency: int | None = None) -> tuple[list[dict], float]:
    """Send every request at its arrival time, or once fewer than `max_concurrency` are in
    flight if that is later; (their results, each with `sent_s`, the wall time)."""
    results: list[dict | None] = [None] * len(workload.prompts)
    slots = threading.Semaphore(max_concurrency) if max_concurrency else None

    def send(i: int) -> None:
        sent = time.perf_counter() - start  # when it went out, after the run's start
        try:
            results[i] = dict(stream_one(url, model, workload.prompts[i],
                                         workload.output_lens[i]), sent_s=sent)
        finally:
            if slots is not None:
                slots.release()

    threads, start = [], time.perf_counter()
    for i, arrival in enumerate(workload.arrival_times):
        delay = start + arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if slots is not None:
            slots.acquire()  # a request in flight must end first
        thread = threading.Thread(target=send, args=(i,), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


def percentiles(values: list[float]) -> dict | None:
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return dict(mean=statistics.fmean(ordered), p50=at(0.5), p90=at(0.9), p99=at(0.99))


def summarize(results: list[dict], wall_s: float) -> dict:
    done = [r for r in results if r["error"] is None]
    ttft = [r["stamps"][0] for r in done if r["stamps"]]
    itl = [b - a for r in done for a, b in zip(r["stamps"], r["stamps"][1:])]
    tokens = sum(r["output_tokens"] for r in done)
    return dict(requests=len(results), completed=len(done),
                errors=[r["error"] for r in results if r["error"] is not None][:5],
                wall_s=wall_s, output_tokens=tokens, output_tok_per_s=tokens / wall_s,
                req_per_s=len(done) / wall_s, ttft_s=percentiles(ttft), itl_s=percentiles(itl),
                e2e_s=percentiles([r["e2e_s"] for r in done]))


def report(summary: dict) -> str:
    lines = [f"{summary['completed']}/{summary['requests']} requests in "
             f"{summary['wall_s']:.1f} s: {summary['req_per_s']:.2f} req/s, "
             f"{summary['output_tok_per_s']:.1f} output tok/s"]
    for name in ("ttft_s", "itl_s", "e2e_s"):
        p = summary[name]
        if p is not None:
            lines.append(f"{name[:-2].upper():5s} ms  mean {1e3 * p['mean']:8.1f}  p50 "
                         f"{1e3 * p['p50']:8.1f}  p90 {1e3 * p['p90']:8.1f}  p99 "
                         f"{1e3 * p['p99']:8.1f}")
    for error in summary["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve.load", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=4.0,
                   help="requests per second (Poisson arrivals); inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None, metavar="N",
                   help="at most N requests in flight; the next one waits for one to end "
                        "(default: no limit)")
    p.add_argument("--input-len", type=parse_length, default=128, metavar="N|LO:HI",
                   help="prompt tokens, fixed or uniform in [LO, HI]")
    p.add_argument("--output-len", type=parse_length, default=128, metavar="N|LO:HI",
                   help="tokens to generate, fixed or uniform in [LO, HI]")
    p.add_argument("--seed", type=int, default=0, help="the workload's seed")
    p.add_argument("--out", default=None, help="write the summary and samples as JSON")
    return p.parse_args(argv)


def _high(length: int | tuple[int, int]) -> int:
    return length if isinstance(length, int) else length[1]


def build_requests(args: argparse.Namespace, vocab_size: int):
    """The workload: `online` at a finite rate, else `throughput` (all at t=0), whose
    prompts and lengths are those of the bench's workloads of the same seed and sizes."""
    if math.isinf(args.request_rate):
        return build_workload("throughput", vocab_size, args.seed, args.num_prompts,
                              args.input_len, args.output_len)
    return build_workload("online", vocab_size, args.seed, args.num_prompts, args.input_len,
                          args.output_len, args.request_rate)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit("error: --max-concurrency must be >= 1")
    if not args.request_rate > 0:  # nan too
        raise SystemExit("error: --request-rate must be > 0 (inf: all at once)")
    card = model_card(args.url)
    if _high(args.input_len) + _high(args.output_len) > card["max_model_len"]:
        raise SystemExit(f"error: --input-len + --output-len exceed the server's "
                         f"max_model_len ({card['max_model_len']})")
    try:
        workload = build_requests(args, card["vocab_size"])
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    results, wall = run(args.url, card["id"], workload, args.max_concurrency)
    summary = summarize(results, wall)
    print(report(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(url=args.url, model=card["id"], workload=workload.name,
                           args=vars(args), summary=summary, samples=results), f, indent=1)
    return 0 if summary["completed"] == summary["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
