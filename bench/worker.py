"""One bench row in its own process: `python -m bench.worker SPEC.json RESULT.json`.

Introduced with the bench (M1). `bench/compare.py` writes a spec (which stage or `hf`,
the workload, the engine settings), starts this worker with the same Python, and reads
the result back: per-request samples, total time, peak memory, KV-cache use and the most
sequences the row ran at once (`max_concurrent_seqs`: the engine's KV stats, whose peaks
are reset after the untimed warm-up, else the most outputs one step returned; for `hf`,
its largest batch). A fresh process per row
keeps one row's memory and warm caches from leaking into the next.

- a stage row builds `LLM(config=stage.EngineConfig(**kwargs))`, keeping only the keys
  that stage's EngineConfig has, then the row's own `overrides` (a milestone spec such as
  `m5:enable_chunked_prefill=false`, checked by compare.py), and drives
  `engine.add_request` / `step` / `has_unfinished_requests` itself, adding each request at
  its arrival time;
- the `hf` row runs transformers `generate` on the same weights, in left-padded batches;
- the `roofline` job measures the GPU's copy bandwidth and matmul rate, and reads its
  total memory (for compare.py's --gpu-memory-gib).

The `chat` workload's later turns are built here: when a turn finishes, the next turn of
its conversation is sent (after its delay in `arrival_times`, 0), its prompt the finished
turn's prompt, the tokens the row generated for it and the workload's next user message
(`Workload.turn_prompt`). So every row sends the same user messages, and the same prompts
wherever two rows generated the same replies. The `hf` row runs chat too: the turns that
are ready when a batch ends (one per conversation at most) make the next batch. Its
replies are transformers' own greedy tokens, generated with EOS suppressed (min_new_tokens
= max_new_tokens) where a stage only ignores EOS, so they can differ from a stage's.

A stage with a prefix cache (M6) reports `prefix_cache_queries` and `prefix_cache_hits`
(prompt tokens looked up at admission, and found) in its KV stats; the worker subtracts
the warm-up's counts and recomputes `prefix_cache_hit_rate`, so they describe the
timed requests only. Each sample also gets `num_cached_tokens` when the stage's outputs
have it (the prompt tokens that request found cached), and `conversation` and `turn` on
the chat workload.

The stage and `hf` rows also give `token_times_s`: for each request, when each of its
output tokens appeared, in seconds after its arrival (the first is its TTFT), for the
inter-token latency (compare.py pools the gaps and keeps only their summary). A stage row
stamps a step's tokens when the step returns (a step that adds k tokens to a request
gives k equal stamps: gaps of 0); the `hf` row takes them from its per-step clock. A
request whose several tokens all came out of one step (a stage that does not stream
them) gets null: no ITL rather than an invented one.
"""

import dataclasses
import gc
import heapq
import importlib
import inspect
import json
import resource
import sys
import time
import traceback
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workloads import Workload  # noqa: E402

WARMUP_PROMPT_LEN, WARMUP_OUTPUT_LEN = 8, 4
WARMUP_BATCH_CUDA = 32  # prompts of the workload's own shapes in a stage's CUDA warm-up


def _tqdm(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a convenience; the bench runs without it
        return None
    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True)


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = _tqdm(total, desc, enabled)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mib(device: torch.device) -> float:
    """CUDA: peak allocated by torch in this process. CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10


def _gpu_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def _sample(prompt_len: int, output_len: int, ttft, tpot, e2e) -> dict:
    return {"prompt_len": prompt_len, "output_len": output_len, "ttft_s": ttft,
            "tpot_s": tpot, "e2e_s": e2e}


PREFIX_COUNTERS = ("prefix_cache_queries", "prefix_cache_hits")


def timed_kv_stats(kv: dict | None, warmup: dict | None) -> dict | None:
    """The KV stats with the prefix-cache counters of the timed requests only: the
    warm-up's subtracted, the hit rate (hits / queries, None without queries) recomputed.
    Stats without the counters (stages before M6) come back as they are."""
    if not kv or not all(isinstance(kv.get(key), int) for key in PREFIX_COUNTERS):
        return kv
    timed = dict(kv)
    for key in PREFIX_COUNTERS:
        timed[key] = kv[key] - ((warmup or {}).get(key) or 0)
    queries = timed["prefix_cache_queries"]
    timed["prefix_cache_hit_rate"] = timed["prefix_cache_hits"] / queries if queries else None
    return timed


def turn_fields(wl: Workload, i: int) -> dict:
    """A chat sample's conversation and turn; nothing for the other workloads."""
    if wl.name != "chat":
        return {}
    return {"conversation": i // wl.turns, "turn": wl.turn_of(i)}


def warmup_prompts(wl: Workload, vocab_size: int, device: torch.device) -> list[list[int]]:
    """The untimed warm-up: one short request on the CPU; on CUDA the workload's first
    WARMUP_BATCH_CUDA prompts at once, every token id shifted by one (the same shapes, so
    the first timed step pays no first-use costs, such as loading the kernels of a new
    logits shape, but nothing a prefix cache could hit later)."""
    if device.type != "cuda":
        return [wl.prompts[0][:WARMUP_PROMPT_LEN]]
    return [[(t + 1) % vocab_size for t in prompt] for prompt in wl.prompts[:WARMUP_BATCH_CUDA]]


def token_times(stamps: list[float], num_out: int, arrival: float) -> list[float] | None:
    """A request's token times in seconds after its arrival, from one stamp per output
    token; None when they cannot give its inter-token gaps: a stamp missing, or several
    tokens that all came out of one step (the stage did not stream them)."""
    if len(stamps) != num_out or (num_out > 1 and stamps[0] == stamps[-1]):
        return None
    return [t - arrival for t in stamps]


# -- a stage -------------------------------------------------------------------------
def run_stage(spec: dict) -> dict:
    wl = Workload.from_dict(spec["workload"])
    stage = importlib.import_module(spec["package"])
    fields = {f.name for f in dataclasses.fields(stage.EngineConfig)}
    wanted = {k: v for k, v in spec["engine"].items() if v is not None}
    kwargs = {k: v for k, v in wanted.items() if k in fields}
    ignored = sorted(k for k in wanted if k not in fields)
    kwargs.update(spec.get("overrides") or {})  # this row's own settings (checked)
    config = stage.EngineConfig(**kwargs)
    llm = stage.LLM(config=config)
    engine = llm.engine
    device = torch.device(spec["device"])
    takes_arrival = "arrival_time" in inspect.signature(engine.add_request).parameters

    def params(n: int):
        return stage.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    for i, prompt in enumerate(warmup_prompts(wl, engine.vocab_size, device)):
        engine.add_request(f"warmup-{i}", prompt, params(WARMUP_OUTPUT_LEN))
    while engine.has_unfinished_requests():
        engine.step()
    _sync(device)
    gc.collect()
    gc.freeze()  # as vLLM does after start-up: no collection walks these objects mid-run
    warmup_kv = engine.kv_cache_stats() if hasattr(engine, "kv_cache_stats") else None
    if hasattr(engine, "reset_stats"):  # peaks (sequences at once, KV slots) of the timed run
        engine.reset_stats()

    n = wl.num_prompts
    order = sorted(range(n), key=lambda i: (wl.arrival_times[i], i))
    stamps: dict[int, list[float]] = {}  # when each output token appeared, per request
    widest = [0]  # the most outputs one step returned: sequences run together
    finished: dict[int, object] = {}
    finish_at: dict[int, float] = {}
    arrival_at: dict[int, float] = {}
    sent: dict[int, list[int]] = {}  # each request's whole prompt
    due: list[tuple[float, int]] = []  # (when, request): known arrivals not yet sent
    bar = _Progress(n, spec["milestone"], spec.get("progress", True))

    def add(i: int, arrival: float) -> None:
        arrival_at[i] = arrival
        before = wl.previous(i)
        sent[i] = (wl.turn_prompt(i) if before is None else wl.turn_prompt(
            i, sent[before], finished[before].outputs[0].token_ids))
        extra = {"arrival_time": arrival} if takes_arrival else {}
        engine.add_request(f"bench-{i}", sent[i], params(wl.output_lens[i]), **extra)

    def step() -> None:
        outputs = engine.step()
        now = time.perf_counter()  # the step's tokens are out: one time for all of them
        widest[0] = max(widest[0], len(outputs))
        for out in outputs:
            i = int(out.request_id.rsplit("-", 1)[1])
            got = len(out.outputs[0].token_ids) if out.outputs else 0
            times = stamps.setdefault(i, [])
            times.extend([now] * (got - len(times)))  # k new tokens: k stamps (gaps of 0)
            if out.finished:
                finished[i] = out
                finish_at[i] = now
                bar.update()
                follower = wl.next_turn(i)
                if follower is not None:  # chat: the conversation's next turn
                    heapq.heappush(due, (now + wl.arrival_times[follower], follower))

    t0 = time.perf_counter()
    if wl.sequential:  # latency: the next request arrives when the previous one is done
        for i in order:
            add(i, time.perf_counter())
            while engine.has_unfinished_requests():
                step()
    else:
        due.extend((t0 + wl.arrival_times[i], i) for i in order if wl.previous(i) is None)
        heapq.heapify(due)
        while due or engine.has_unfinished_requests():
            while due and due[0][0] <= time.perf_counter():
                arrival, i = heapq.heappop(due)
                add(i, arrival)
            if engine.has_unfinished_requests():
                step()
            elif due:
                time.sleep(max(0.0, due[0][0] - time.perf_counter()))
    _sync(device)
    total = time.perf_counter() - t0
    bar.close()

    samples, times = [], []
    for i in range(n):
        out = finished[i]
        m = getattr(out, "metrics", None)
        ttft = getattr(m, "ttft", None) if m is not None else None
        tpot = getattr(m, "tpot", None) if m is not None else None
        e2e = getattr(m, "e2e_latency", None) if m is not None else None
        if e2e is None or e2e < 0 or (ttft is not None and ttft < 0):
            # no metrics, or a stage whose clock is not time.perf_counter: our own timing
            e2e, ttft, tpot = finish_at[i] - arrival_at[i], None, None
        if ttft is None and stamps.get(i):
            ttft = stamps[i][0] - arrival_at[i]
        num_out = len(out.outputs[0].token_ids)
        if tpot is None and ttft is not None:
            tpot = (e2e - ttft) / (num_out - 1) if num_out > 1 else 0.0
        sample = _sample(len(sent[i]), num_out, ttft, tpot, e2e)
        if getattr(out, "num_cached_tokens", None) is not None:  # M6 on: its cache hits
            sample["num_cached_tokens"] = out.num_cached_tokens
        samples.append(dict(sample, **turn_fields(wl, i)))
        times.append(token_times(stamps.get(i, []), num_out, arrival_at[i]))

    kv = engine.kv_cache_stats() if hasattr(engine, "kv_cache_stats") else None
    kv = timed_kv_stats(kv, warmup_kv)
    at_once = (kv or {}).get("max_concurrent_seqs") or widest[0]
    notes = []
    name = spec["milestone"]
    if wl.name in ("prefix", "chat") and not getattr(config, "enable_prefix_caching", False):
        what = ("the shared prefix is computed for every request" if wl.name == "prefix"
                else "every turn computes its whole conversation again")
        whose = ("prefix cache off" if "enable_prefix_caching" in fields
                 else f"no prefix cache in {name}")
        notes.append(f"{whose}: {what}")
    if wl.name == "online" and not takes_arrival:
        notes.append("arrival times not passed to add_request (TTFT counts from add)")
    if ignored:
        notes.append(f"{name}'s EngineConfig has no {', '.join(ignored)} (ignored)")
    return {"samples": samples, "token_times_s": times, "total_time_s": total,
            "peak_memory_mib": _peak_memory_mib(device), "kv_cache": kv,
            "max_concurrent_seqs": at_once, "note": "; ".join(notes),
            "gpu": _gpu_name(device), "weights": weight_bytes(spec["package"], engine)}


def weight_bytes(package: str, engine) -> dict:
    """Bytes of the model's weights: {"total"} (shared tensors once), and from M7 on
    {"quantized", "dense"}: the GPTQ layers, and the same layers unquantized (zero when
    the row runs unquantized)."""
    model = engine.model_runner.model
    try:
        gptq = importlib.import_module(f"{package}.model_executor.layers.quantization.gptq")
    except ModuleNotFoundError:
        seen = {t.data_ptr(): t.numel() * t.element_size() for t in model.parameters()}
        return {"total": sum(seen.values())}
    return gptq.weight_bytes(model)


# -- transformers --------------------------------------------------------------------
def run_hf(spec: dict) -> dict:
    import transformers
    from transformers import (AutoModelForCausalLM, GenerationConfig, StoppingCriteria,
                              StoppingCriteriaList)

    wl = Workload.from_dict(spec["workload"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    dtype_kw = ("dtype" if int(transformers.__version__.split(".")[0]) >= 5
                else "torch_dtype")
    model, info = AutoModelForCausalLM.from_pretrained(
        spec["hf_path"], output_loading_info=True, attn_implementation="sdpa",
        **{dtype_kw: dtype})
    missing = [k for k in info.get("missing_keys", []) if "rotary" not in k]
    if missing:
        raise RuntimeError(f"transformers model lacks weights for {sorted(missing)[:3]}")
    model = model.to(device).eval()
    cfg = model.config
    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else cfg.eos_token_id
    eos_list = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = next((p for p in (gen_cfg.pad_token_id, getattr(cfg, "pad_token_id", None))
                if p is not None), eos_list[0] if eos_list else 0)

    class Clock(StoppingCriteria):
        """Timestamps every generation step (called once per new token); never stops."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            _sync(device)
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    @torch.inference_mode()
    def generate(prompts: list[list[int]], out_lens: list[int],
                 arrivals: list[float]) -> list[tuple[dict, list[float] | None, list[int]]]:
        """One left-padded batch; per request, its sample and token times, both from the
        step timestamps, and its own output tokens (its reply)."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        new = max(out_lens)
        config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  pad_token_id=pad, eos_token_id=eos_list or None,
                                  bos_token_id=cfg.bos_token_id)
        clock = Clock()
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=config,
                             stopping_criteria=StoppingCriteriaList([clock]))
        _sync(device)
        end = time.perf_counter()
        produced = out.shape[1] - width
        samples = []
        for row, (p, want, arrival) in enumerate(zip(prompts, out_lens, arrivals)):
            n = min(want, produced)
            first = clock.times[0] if clock.times else end
            last = clock.times[n - 1] if len(clock.times) >= n else end
            sample = _sample(len(p), n, first - arrival,
                             (last - first) / (n - 1) if n > 1 else 0.0, last - arrival)
            reply = out[row, width:width + n].tolist()
            samples.append((sample, token_times(clock.times[:n], n, arrival), reply))
        return samples

    sent: dict[int, list[int]] = {}  # each request's whole prompt
    replies: dict[int, list[int]] = {}

    def run_batch(idx: list[int], arrivals: list[float]) -> list[tuple[dict, list | None]]:
        for i in idx:
            before = wl.previous(i)
            sent[i] = (wl.turn_prompt(i) if before is None
                       else wl.turn_prompt(i, sent[before], replies[before]))
        done = generate([sent[i] for i in idx], [wl.output_lens[i] for i in idx], arrivals)
        out = []
        for i, (sample, times, reply) in zip(idx, done):
            replies[i] = reply
            out.append((dict(sample, **turn_fields(wl, i)), times))
        return out

    # warm-up: one short request, not timed
    generate([wl.prompts[0][:WARMUP_PROMPT_LEN]], [WARMUP_OUTPUT_LEN], [time.perf_counter()])
    _sync(device)

    n = wl.num_prompts
    batch = spec.get("hf_batch_size") or wl.num_conversations  # chat: one turn each at most
    order = sorted(range(n), key=lambda i: (wl.arrival_times[i], i))
    arrival_of = {i: wl.arrival_times[i] for i in order if wl.previous(i) is None}
    samples: dict[int, tuple[dict, list | None]] = {}  # request -> (sample, token times)
    widest = 1  # the largest batch
    bar = _Progress(n, spec["milestone"], spec.get("progress", True))
    t0 = time.perf_counter()
    if wl.sequential:
        for i in order:
            samples.update(zip([i], run_batch([i], [time.perf_counter()])))
            bar.update()
        note = ("transformers generate, one request at a time; TTFT and TPOT timed at each "
                "generation step inside generate")
    else:  # arrival_of: seconds after t0, once known (a chat turn's: its previous ended)
        pending = list(order)
        while pending:
            now = time.perf_counter() - t0
            ready = sorted((i for i in pending if arrival_of.get(i, now + 1) <= now),
                           key=lambda i: (arrival_of[i], i))[:batch]
            if not ready:
                time.sleep(max(0.0, min(arrival_of[i] for i in pending if i in arrival_of)
                               - now))
                continue
            widest = max(widest, len(ready))
            taken = set(ready)
            pending = [i for i in pending if i not in taken]
            arrivals = [t0 + arrival_of[i] for i in ready]
            samples.update(zip(ready, run_batch(ready, arrivals)))
            end = time.perf_counter() - t0
            for i in ready:
                follower = wl.next_turn(i)
                if follower is not None:
                    arrival_of[follower] = end + wl.arrival_times[follower]
            bar.update(len(ready))
        how = (f"static batches of up to {batch} prompts" if wl.name not in ("online", "chat")
               else f"static batches (up to {batch}) of the requests waiting when the "
               "previous batch ends")
        note = (f"transformers generate, {how}, left-padded; each batch generates its "
                "longest output_len (min_new_tokens = max_new_tokens) and each request "
                "counts only its own output_len tokens; TTFT and TPOT timed at each "
                "generation step inside generate")
        if wl.name == "prefix":
            note += "; no prefix cache: the shared prefix is computed for every request"
        if wl.name == "chat":
            note += ("; a turn is sent once its previous turn's batch has ended, and computes "
                     "its whole conversation again (no prefix cache)")
    _sync(device)
    total = time.perf_counter() - t0
    bar.close()
    return {"samples": [samples[i][0] for i in range(n)],
            "token_times_s": [samples[i][1] for i in range(n)], "total_time_s": total,
            "peak_memory_mib": _peak_memory_mib(device), "kv_cache": None,
            "max_concurrent_seqs": widest, "note": note, "gpu": _gpu_name(device)}


# -- the machine ---------------------------------------------------------------------
def run_roofline(spec: dict) -> dict:
    from bench.roofline import measure

    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no GPU")
    device = torch.device(spec["device"])
    result = measure(spec["device"])
    result["gpu"] = _gpu_name(device)
    result["total_memory_bytes"] = torch.cuda.mem_get_info(device)[1]  # --gpu-memory-gib
    return result


def _jsonable(value):
    """kv_cache_stats() may hold tensors or numpy numbers: write them as plain values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


JOBS = {"stage": run_stage, "hf": run_hf, "roofline": run_roofline}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m bench.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        result = JOBS[spec["kind"]](spec)
    except Exception as exc:  # reported to compare.py, which marks the row as failed
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    Path(argv[1]).write_text(json.dumps(result, default=_jsonable))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
