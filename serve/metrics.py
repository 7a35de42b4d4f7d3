"""`GET /metrics`: the server's state and latencies in Prometheus' text format.

Gauges come from the engine thread's last snapshot (sequences running and waiting, and
every number of the engine's `kv_cache_stats()`: KV token slots reserved and used,
preemptions, prefix-cache hits) and from the server (requests open). Counters add up
tokens in and out and finished requests by reason; histograms hold each request's time
to first token (TTFT), the time between its outputs (ITL) and its end-to-end latency, as
the handlers saw them.

Introduced after M7 (issue 25).
"""

from __future__ import annotations

import bisect
import math
import time

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
           30.0, 60.0)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: above every bucket
        self.total, self.count = 0.0, 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip((*BUCKETS, math.inf), self.counts):
            cumulative += n
            le = "+Inf" if bound == math.inf else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        return out + [f"{name}_sum {self.total}", f"{name}_count {self.count}"]


class Metrics:
    """What the handlers record (on the event loop) and what /metrics renders."""

    def __init__(self) -> None:
        self.ttft, self.itl, self.e2e = Histogram(), Histogram(), Histogram()
        self.prompt_tokens = self.generation_tokens = 0
        self.finished: dict[str, int] = {}

    def clock(self) -> "RequestClock":
        return RequestClock(self)

    def request_done(self, final, reason: str) -> None:
        """A request ended: `reason` "stop", "length", "abort" (its client left) or
        "error"; `final` its last output (None if it had none)."""
        self.finished[reason] = self.finished.get(reason, 0) + 1
        if final is not None:
            self.prompt_tokens += len(final.prompt_token_ids)
            self.generation_tokens += sum(len(c.token_ids) for c in final.outputs)

    def render(self, snapshot: dict, open_requests: int) -> str:
        lines = []

        def metric(name: str, kind: str, help_: str, values: list[str]) -> None:
            lines.extend([f"# HELP folovllm_{name} {help_}", f"# TYPE folovllm_{name} {kind}"])
            lines.extend(f"folovllm_{name}{v}" for v in values)

        metric("requests_open", "gauge", "requests the server is answering", [f" {open_requests}"])
        metric("sequences_running", "gauge", "sequences in the engine's running queue",
               [f" {snapshot.get('running', 0)}"])
        metric("sequences_waiting", "gauge", "sequences waiting to be scheduled",
               [f" {snapshot.get('waiting', 0)}"])
        for key, value in sorted(snapshot.get("kv", {}).items()):
            metric(f"kv_{key}", "gauge", f"kv_cache_stats()['{key}']", [f" {value}"])
        metric("prompt_tokens_total", "counter", "prompt tokens of finished requests",
               [f" {self.prompt_tokens}"])
        metric("generation_tokens_total", "counter", "tokens generated for finished requests",
               [f" {self.generation_tokens}"])
        metric("requests_finished_total", "counter", "finished requests, by how they ended",
               [f'{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())])
        for name, hist, help_ in (("time_to_first_token_seconds", self.ttft, "TTFT"),
                                  ("inter_token_latency_seconds", self.itl,
                                   "time between a request's outputs"),
                                  ("e2e_request_latency_seconds", self.e2e,
                                   "arrival to last output")):
            lines.extend([f"# HELP folovllm_{name} {help_}",
                          f"# TYPE folovllm_{name} histogram"])
            lines.extend(hist.lines(f"folovllm_{name}"))
        return "\n".join(lines) + "\n"


class RequestClock:
    """One request's times: made when it arrives, told of each output and of its end."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics, self.start, self.last = metrics, time.perf_counter(), None

    def output(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now

    def end(self, final, reason: str) -> None:
        if self.last is not None:
            self.metrics.e2e.observe(self.last - self.start)
        self.metrics.request_done(final, reason)
