"""The workload's roofline: how fast the GPU could run it at best.

Introduced with the bench (M1). Two machine numbers are measured once, on the device,
in a worker process (`measure`):

- copy bandwidth B: a 1 GiB device-to-device copy, (bytes read + bytes written) / time,
  the median of 10 timings with CUDA events;
- matmul rate F: a bf16 8192 x 8192 x 8192 matmul, 2 * 8192^3 FLOPs / time, median of 10.

`simulate` then runs an ideal schedule of the workload and sums, step by step,

    step time = max(bytes / B, flops / F)

with these costs (itemsize = bytes per weight, e.g. 2 for bf16; L layers, Hq query heads,
head_dim d, hidden h, vocabulary V; P = the matmul parameters of all layers):

- weight bytes W = itemsize * (all parameters, minus the input embedding when it is not
  tied to lm_head: an embedding lookup reads only its rows);
- KV bytes per token k = 2 (K and V) * L * kv_heads * d * itemsize;
- a prefill step of newly admitted sequences, each computing t tokens from position s
  (s = 0, or the shared prefix length once the prefix has been computed):
      bytes = W + sum (s + t) * k                (KV written, and a cached prefix read)
      flops = sum [ 2 * P * t + 2 * V * h        (layers for every token; one logits row)
                    + 4 * L * Hq * d * (t * s + t * (t + 1) / 2) ]   (causal QK^T and PV)
- a decode step of the running batch, each sequence with c tokens in its cache:
      bytes = W + sum c * k                      (weights once, every sequence's KV read)
      flops = sum [ 2 * (P + V * h) + 4 * L * Hq * d * c ]

The schedule: at most `max_batch_size` sequences run at once (1 for `latency`: one
request at a time). Whenever sequences have arrived and slots are free, they are
admitted together in one prefill step (which gives each its first token); otherwise all
running sequences take one decode step; a sequence leaves after its last token; when
nothing runs the clock jumps to the next arrival (`online`). On the `prefix` workload
the shared prefix is computed once (the best a prefix cache can do) and only read after.
On `chat`, a later turn arrives when the turn before it has finished (`after`), and its
conversation so far is in the cache already (`cached_lens`: s above), so it computes only
the previous reply's last token and its new user message.

roofline_fraction = roofline time / measured total time (1.0 would be the hardware limit).
"""

from dataclasses import dataclass


@dataclass
class ModelCost:
    weight_bytes: float  # W
    kv_bytes_per_token: float  # k
    layer_matmul_params: float  # P
    lm_head_params: float  # V * h
    attn_flops_per_pair: float  # 4 * L * Hq * d: one query token against one cached token


def model_cost(mc, itemsize: int) -> ModelCost:
    """Costs of a model, from its ModelConfig (any stage's) and the bytes per weight."""
    h, q, kv, d = mc.hidden_size, mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
    layer = h * q * d + 2 * h * kv * d + q * d * h + 3 * h * mc.intermediate_size
    embed = mc.vocab_size * h
    params = mc.num_parameters() - (0 if mc.tie_word_embeddings else embed)
    return ModelCost(
        weight_bytes=float(params * itemsize),
        kv_bytes_per_token=float(2 * mc.num_hidden_layers * kv * d * itemsize),
        layer_matmul_params=float(mc.num_hidden_layers * layer),
        lm_head_params=float(embed),
        attn_flops_per_pair=float(4 * mc.num_hidden_layers * q * d),
    )


def simulate(cost: ModelCost, prompt_lens: list[int], output_lens: list[int],
             arrival_times: list[float], max_batch_size: int, bandwidth: float,
             matmul_rate: float, prefix_len: int = 0, after: list[int | None] | None = None,
             cached_lens: list[int] | None = None) -> dict:
    """Roofline time of the ideal schedule (see the module docstring).

    bandwidth in bytes/s, matmul_rate in FLOP/s. `after[i]`: the request that must finish
    before request i arrives (its arrival time then counts from that finish); None: no
    such request. `cached_lens[i]`: its prompt tokens already in the cache. Returns
    time_s, bytes, flops, steps.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size: must be >= 1, got {max_batch_size}")
    n = len(prompt_lens)
    after = after or [None] * n
    cached_lens = cached_lens or [0] * n
    ready_at = {i: arrival_times[i] for i in range(n) if after[i] is None}  # known arrivals
    follower = {j: i for i, j in enumerate(after) if j is not None}
    waiting = set(range(n))
    running: list[list[int]] = []  # [tokens in cache, tokens still to generate, request]
    clock = total_bytes = total_flops = 0.0
    steps = 0
    prefix_done = False
    cost_w, k, a = cost.weight_bytes, cost.kv_bytes_per_token, cost.attn_flops_per_pair
    token_flops = 2 * cost.layer_matmul_params

    def account(nbytes: float, flops: float) -> None:
        nonlocal clock, total_bytes, total_flops, steps
        clock += max(nbytes / bandwidth, flops / matmul_rate)
        total_bytes += nbytes
        total_flops += flops
        steps += 1

    def finish(i: int) -> None:  # at the end of the step just accounted
        if i in follower:
            ready_at[follower[i]] = clock + arrival_times[follower[i]]

    while waiting or running:
        arrived = sorted((i for i in waiting if ready_at.get(i, clock + 1) <= clock),
                         key=lambda i: (ready_at[i], i))
        free = max_batch_size - len(running)
        if arrived and free > 0:
            admitted = arrived[:free]
            waiting.difference_update(admitted)
            nbytes, flops = cost_w, 0.0
            for i in admitted:
                p = prompt_lens[i]
                s = min(max(prefix_len if prefix_done else 0, cached_lens[i]), p - 1)
                t = p - s
                nbytes += p * k
                flops += token_flops * t + 2 * cost.lm_head_params
                flops += a * (t * s + t * (t + 1) / 2)
                if output_lens[i] > 1:
                    running.append([p, output_lens[i] - 1, i])
                prefix_done = prefix_done or prefix_len > 0
            account(nbytes, flops)
            for i in admitted:
                if output_lens[i] <= 1:
                    finish(i)
        elif running:
            # each sequence feeds its newest token: its cache grows to c + 1 and is read
            ctx = sum(c + 1 for c, _, _ in running)
            account(cost_w + ctx * k,
                    len(running) * (token_flops + 2 * cost.lm_head_params) + a * ctx)
            for seq in running:
                seq[0] += 1
                seq[1] -= 1
                if seq[1] == 0:
                    finish(seq[2])
            running = [seq for seq in running if seq[1] > 0]
        else:
            clock = min(ready_at[i] for i in waiting if i in ready_at)
    return {"time_s": clock, "bytes": total_bytes, "flops": total_flops, "steps": steps}


def measure(device: str = "cuda", repeats: int = 10) -> dict:
    """Measure copy bandwidth (GB/s) and bf16 matmul rate (TFLOP/s) on a CUDA device."""
    import statistics

    import torch

    dev = torch.device(device)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize(dev)
        times = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    nbytes = 1 << 30
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src))
    del src, dst
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    c = torch.empty(n, n, dtype=torch.bfloat16, device=dev)
    mm_s = timed(lambda: torch.matmul(a, b, out=c))
    del a, b, c
    torch.cuda.empty_cache()
    return {"bandwidth_gbps": 2 * nbytes / copy_s / 1e9,
            "matmul_tflops": 2 * n ** 3 / mm_s / 1e12}
