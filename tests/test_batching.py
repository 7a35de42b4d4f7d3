"""Continuous batching (M2 on): every request in a batch gets the tokens it gets alone.

Introduced in M2 (issue 4). Greedy fp32 on the CPU: requests with different prompt
lengths and max_tokens, some added while others run and some aborted, give the same
tokens as transformers and as their own solo runs. Property-based tests drive the
engine over random workloads with a fake forward pass (deterministic tokens, no model)
and check the scheduler's limits at every step.
"""

import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (default_model_folder, hf_greedy, load_stage, model_runner, replace_forward,
                      stages_with)

BATCHING_STAGES = stages_with("batching")
# Stages whose KV cache is one contiguous slot per sequence (M2 only).
CONTIGUOUS_STAGES = [s for s in BATCHING_STAGES if s not in stages_with("paged")]
CHUNKED_STAGES = stages_with("chunked_prefill")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3,",
    "Water boils at",
    "The quick brown fox",
]
MAX_TOKENS = [16, 4, 10, 1, 8, 12]


def greedy(stage: str, n: int):
    """Exactly n greedy tokens; EOS masked until then, as `hf_greedy` does."""
    return load_stage(stage).SamplingParams(temperature=0, max_tokens=n, min_tokens=n)


def run_to_end(engine, outputs: dict, finished: dict, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return
        record_step(engine.step(), outputs, finished)
    raise AssertionError("the engine did not finish")


def record_step(step_outputs, outputs: dict, finished: dict) -> None:
    ids = [out.request_id for out in step_outputs]
    assert len(ids) == len(set(ids)), f"a request has two outputs in one step: {ids}"
    for out in step_outputs:
        assert out.request_id not in finished, f"{out.request_id} ran after it finished"
        outputs.setdefault(out.request_id, []).append(out)
        if out.finished:
            finished[out.request_id] = out


def assert_kv_cache_empty(engine) -> None:
    """Nothing is held in the KV cache (works for slots and for blocks)."""
    stats = engine.kv_cache_stats()
    assert stats["used_token_slots"] == 0
    scheduler = engine.scheduler
    if stats["kind"] == "contiguous":
        assert sorted(scheduler.free_slots) == list(range(stats["num_slots"]))
    else:
        pool = scheduler.kv_cache_manager.block_pool
        assert pool.num_free_blocks == stats["num_blocks"]
        assert all(block.ref_count == 0 for block in pool.blocks)


# --- the default model against transformers --------------------------------------------

@pytest.fixture(scope="module")
def hf_default():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(default_model_folder()), dtype=torch.float32).eval()


@pytest.mark.slow  # the default model (SmolLM2-135M)
@pytest.mark.parametrize("stage", BATCHING_STAGES)
def test_mixed_batch_matches_transformers_and_solo_runs(stage, hf_default):
    llm = load_stage(stage).LLM("default", max_model_len=128, max_batch_size=3,
                                device="cpu", dtype="float32")
    engine = llm.engine
    outputs, finished = {}, {}
    # Four requests, three at most per step: r3 waits until a sequence leaves.
    for i in range(4):
        engine.add_request(f"r{i}", PROMPTS[i], greedy(stage, MAX_TOKENS[i]))
    for _ in range(3):  # a prefill of r0..r2, then two decode steps
        step = engine.step()
        assert len(step) <= 3
        record_step(step, outputs, finished)
    assert {"r0", "r1", "r2"} <= set(outputs) and "r3" not in outputs
    # Requests arrive while others run; one running and one waiting request are aborted.
    engine.add_request("r4", PROMPTS[4], greedy(stage, MAX_TOKENS[4]))
    engine.add_request("r5", PROMPTS[5], greedy(stage, MAX_TOKENS[5]))
    engine.add_request("gone", PROMPTS[0], greedy(stage, 8))
    engine.abort_request("r2")
    engine.abort_request("gone")
    num_r2_outputs = len(outputs["r2"])
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            break
        step = engine.step()
        assert len(step) <= 3
        record_step(step, outputs, finished)
    # An aborted request just disappears: no output after the abort, never finished.
    assert len(outputs["r2"]) == num_r2_outputs and "r2" not in finished
    assert "gone" not in outputs
    assert sorted(finished) == ["r0", "r1", "r3", "r4", "r5"]
    assert_kv_cache_empty(engine)
    assert engine.kv_cache_stats()["max_concurrent_seqs"] == 3

    for i in (0, 1, 3, 4, 5):
        out = finished[f"r{i}"]
        ids = llm.encode(PROMPTS[i])
        assert out.prompt_token_ids == ids
        assert len(out.token_ids) == MAX_TOKENS[i] and out.finish_reason == "length"
        assert out.token_ids == hf_greedy(hf_default, ids, MAX_TOKENS[i]), (
            f"{stage}: r{i} in a batch diverges from transformers")
        solo = llm.generate(PROMPTS[i], greedy(stage, MAX_TOKENS[i]), use_tqdm=False)[0]
        assert out.token_ids == solo.token_ids, f"{stage}: r{i} batched != alone"
        assert out.text == solo.text


# --- tiny model: batched == alone ------------------------------------------------------

TINY_PROMPTS = [[3 + (7 * i + 13 * k) % 250 for k in range(n)]
                for i, n in enumerate([1, 5, 17, 60, 2, 33, 9, 24])]
TINY_MAX_TOKENS = [12, 3, 8, 10, 1, 6, 12, 5]


@pytest.fixture(scope="module")
def tiny_llms():
    """A small token budget (40) splits the prefills; the 60-token prompt goes alone."""
    return {stage: load_stage(stage).LLM("dummy:tiny-llama", max_model_len=128,
                                         max_batch_size=4, max_num_batched_tokens=40,
                                         device="cpu", dtype="float32")
            for stage in BATCHING_STAGES}


def spy_on_schedule(engine) -> list:
    """Record what the scheduler hands out at every step."""
    log = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        is_prefill = all(s.num_computed_tokens == 0 for s in out.scheduled)
        log.append((is_prefill, [s.seq_name for s in out.scheduled], out.num_batched_tokens))
        return out

    engine.scheduler.schedule = recording_schedule
    return log


@pytest.mark.parametrize("stage", BATCHING_STAGES)
def test_tiny_batch_equals_solo_runs(stage, tiny_llms):
    llm = tiny_llms[stage]
    SamplingParams = load_stage(stage).SamplingParams
    # Greedy and seeded random sampling: a request's own generator makes its draws
    # independent of the batch it runs in.
    params = [SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=n,
                             ignore_eos=True)
              for i, n in enumerate(TINY_MAX_TOKENS)]
    solo = [llm.generate(p, sp, use_tqdm=False)[0].token_ids
            for p, sp in zip(TINY_PROMPTS, params)]
    if hasattr(llm, "reset_prefix_cache"):  # M6: the solo runs cached every prompt
        llm.reset_prefix_cache()
    log = spy_on_schedule(llm.engine)
    try:
        batched = llm.generate(TINY_PROMPTS, params, use_tqdm=False)
    finally:
        del llm.engine.scheduler.schedule
    for i, out in enumerate(batched):
        assert len(out.token_ids) == TINY_MAX_TOKENS[i]
        assert out.token_ids == solo[i], f"{stage}: request {i} batched != alone"
    # Batches really formed, within the limits.
    assert max(len(ids) for _, ids, _ in log) == 4
    long_id = batched[3].request_id
    if stage in CHUNKED_STAGES:
        # Every step within the budget; the 60-token prompt in chunks, beside others.
        assert all(len(ids) <= 4 and num_tokens <= 40 for _, ids, num_tokens in log)
        long_steps = [ids for _, ids, _ in log if long_id in ids]
        num_chunks = len(long_steps) - (TINY_MAX_TOKENS[3] - 1)  # less its decode steps
        assert num_chunks >= 2
        assert any(len(ids) > 1 for ids in long_steps[:num_chunks])
        return
    # Without chunks: prefills within the budget; the long prompt was prefilled alone.
    for is_prefill, ids, num_tokens in log:
        assert len(ids) <= 4
        if is_prefill and len(ids) > 1:
            assert num_tokens <= 40
    assert [ids for is_prefill, ids, _ in log if is_prefill and long_id in ids] == [[long_id]]
    assert sum(1 for is_prefill, _, _ in log if is_prefill) >= 3


@pytest.mark.parametrize("stage", BATCHING_STAGES)
def test_attention_reads_only_what_was_written(stage):
    """A cache full of NaN before the run changes nothing: padding is never read."""
    mod = load_stage(stage)
    sp = mod.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llms = [mod.LLM("dummy:tiny-llama", max_model_len=128, max_batch_size=4, device="cpu",
                    kv_cache_memory=2**20) for _ in range(2)]
    for k_cache, v_cache in model_runner(llms[1]).kv_caches:
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
    clean, poisoned = (llm.generate(TINY_PROMPTS[:5], sp, use_tqdm=False) for llm in llms)
    assert [o.token_ids for o in poisoned] == [o.token_ids for o in clean]


@pytest.mark.parametrize("stage", BATCHING_STAGES)
def test_abort_leaves_the_others_untouched(stage, tiny_llms):
    llm = tiny_llms[stage]
    engine = llm.engine
    SamplingParams = load_stage(stage).SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = {f"a{i}": llm.generate(TINY_PROMPTS[i], sp, use_tqdm=False)[0].token_ids
                for i in (0, 2, 5)}
    for i in range(6):  # 4 run, 2 wait
        engine.add_request(f"a{i}", TINY_PROMPTS[i], sp)
    outputs, finished = {}, {}
    record_step(engine.step(), outputs, finished)
    record_step(engine.step(), outputs, finished)
    engine.abort_request("a1")  # running
    engine.abort_request("a3")  # running
    engine.abort_request("a4")  # waiting
    engine.abort_request("no-such-request")  # unknown ids are ignored
    run_to_end(engine, outputs, finished)
    engine.abort_request("a0")  # already finished: nothing happens
    assert sorted(finished) == ["a0", "a2", "a5"]
    assert "a4" not in outputs
    for rid, tokens in expected.items():
        assert finished[rid].token_ids == tokens
    assert_kv_cache_empty(engine)
    # The id of a finished or aborted request can be used again.
    engine.add_request("a1", TINY_PROMPTS[1], sp)
    finished = {}
    run_to_end(engine, {}, finished)
    assert len(finished["a1"].token_ids) == 10


# --- configuration and statistics ------------------------------------------------------

@pytest.mark.parametrize("stage", BATCHING_STAGES)
@pytest.mark.parametrize("field,value", [("max_batch_size", 0), ("max_batch_size", -3),
                                         ("max_num_batched_tokens", 0),
                                         ("kv_cache_memory", 0)])
def test_bad_limits_are_rejected(stage, field, value):
    with pytest.raises(ValueError, match=field):
        load_stage(stage).EngineConfig(**{field: value})


@pytest.mark.parametrize("stage", BATCHING_STAGES)
def test_kv_cache_memory_too_small_for_one_sequence(stage):
    with pytest.raises(ValueError, match="kv_cache_memory"):
        load_stage(stage).LLM("dummy:tiny-llama", max_model_len=64, kv_cache_memory=100,
                              device="cpu")


@pytest.mark.parametrize("stage", CONTIGUOUS_STAGES)
def test_contiguous_slots_and_their_waste(stage):
    mod = load_stage(stage)
    probe = mod.LLM("dummy:tiny-llama", max_model_len=64, max_batch_size=8, device="cpu")
    slot_bytes = model_runner(probe).kv_cache_bytes_per_token() * 64
    assert probe.engine.kv_cache_stats()["num_slots"] == 8  # max_batch_size, no budget
    # A budget of 3.5 slots holds 3: at most 3 sequences run at once.
    llm = mod.LLM("dummy:tiny-llama", max_model_len=64, max_batch_size=8, device="cpu",
                  kv_cache_memory=int(3.5 * slot_bytes))
    k_cache, _ = model_runner(llm).kv_caches[0]
    assert k_cache.shape[:2] == (3, 64)
    sp = mod.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate([[5 + i] * (3 + i) for i in range(7)], sp, use_tqdm=False)
    assert all(len(out.token_ids) == 6 for out in outputs)
    stats = llm.engine.kv_cache_stats()
    assert stats["kind"] == "contiguous" and stats["num_slots"] == 3
    assert stats["max_concurrent_seqs"] == 3
    assert stats["reserved_token_slots"] == 3 * 64
    # Three at a time (prompts of 3-5, then 6-8 tokens, then 9), finishing together; the
    # fullest step is the last one of the second group: each prompt + 5 tokens in cache.
    assert stats["used_token_slots_peak"] == (6 + 7 + 8) + 3 * 5
    assert stats["used_token_slots"] == 0
    assert stats["kv_cache_bytes"] == 3 * slot_bytes


# --- property-based: random workloads through a fake forward pass ----------------------

MODEL_MAX_LEN = 64


def fake_token(request_id: str, index: int) -> int:
    """The token a request gets at position `index`: fixed, whatever the batch."""
    return 3 + zlib.crc32(f"{request_id}/{index}".encode()) % 250


def computed_before_step(seq, num_new: dict) -> int:
    """Tokens of `seq` whose K/V were in the cache before the step the fake forward pass
    runs: from M4 the scheduler counts a scheduled step as computed at once (so the next
    step can be scheduled before this one's results are back)."""
    ahead = num_new.get(seq.seq_id, 0) if hasattr(seq, "num_pending_tokens") else 0
    return seq.num_computed_tokens - ahead


def check_scheduler_output(out, tables: dict | None = None) -> None:
    """The worker's input is plain ints that say exactly what each sequence computes.

    From M4 the scheduler sends a running sequence only its new blocks: `tables` plays
    the worker, keeping each sequence's table from those messages, which must always
    equal the blocks the sequence holds."""
    assert len(out.scheduled) == len(out.seqs)
    assert out.num_batched_tokens == sum(len(s.new_token_ids) for s in out.scheduled)
    for name in getattr(out, "preempted_seq_names", []) + out.finished_seq_names:
        tables.pop(name, None)  # M4 on: the worker forgets their tables
    for seq, s in zip(out.seqs, out.scheduled):
        assert s.seq_name == seq.name  # M6: `id/i` for n samples
        # M4 on: a scheduled step counts at once (so the next can be scheduled before
        # its results are back); this runs synchronously, so nothing was pending.
        ahead = len(s.new_token_ids) if hasattr(seq, "num_pending_tokens") else 0
        assert s.num_computed_tokens == seq.num_computed_tokens - ahead
        end = s.num_computed_tokens + len(s.new_token_ids)
        assert s.new_token_ids == seq.token_ids[s.num_computed_tokens:end]
        assert s.new_token_ids, "a scheduled sequence computes at least one token"
        # How to sample it comes with its first step (and again with a restart)
        starts = s.is_new if hasattr(s, "is_new") else s.num_computed_tokens == 0
        assert (s.new_sequence is not None) == starts
        if starts:
            assert s.new_sequence.sampling_params is seq.sampling_params
            assert s.new_sequence.prompt_token_ids == seq.token_ids[:seq.num_prompt_tokens]
        # Up to its last token; M5: or a chunk, which names the token after it.
        assert getattr(s, "next_token_id", None) == (
            seq.token_ids[end] if end < len(seq.token_ids) else None)
        held = ([b.block_id for b in seq.kv_blocks] if hasattr(seq, "kv_blocks")
                else [seq.kv_slot])
        if hasattr(s, "new_block_ids"):  # M4 on: the worker keeps the tables
            # M6: a sequence may start with cached tokens (a prefix hit, a fork)
            assert s.is_new == (s.num_computed_tokens == getattr(seq, "num_cached_tokens", 0))
            assert s.is_new or s.seq_name in tables
            table = [] if s.is_new else tables[s.seq_name]
            tables[s.seq_name] = table + s.new_block_ids
            assert tables[s.seq_name] == held
            assert all(isinstance(b, int) for b in s.new_block_ids)
        else:
            assert s.block_ids == held and all(isinstance(b, int) for b in s.block_ids)


def install_fake_forward(engine, check_step) -> None:
    """Replace the model with a function of (request, position); keep all bookkeeping."""
    stage = type(engine).__module__.split(".")[0]
    ModelRunnerOutput = load_stage(stage).worker.model_runner.ModelRunnerOutput

    tables = {}  # what a worker would keep, from the scheduler's messages (M4 on)

    def execute_model(scheduler_output):
        check_scheduler_output(scheduler_output, tables)
        seqs = scheduler_output.seqs
        num_new = {seq.seq_id: len(s.new_token_ids)
                   for seq, s in zip(seqs, scheduler_output.scheduled)}
        starts = [getattr(seq, "num_cached_tokens", 0) for seq in seqs]  # M6: prefix hits
        check_step(seqs, all(s.num_computed_tokens == start for s, start
                             in zip(scheduler_output.scheduled, starts)), num_new)
        none = [None] * len(seqs)
        # A chunk that stops inside its prompt gets no token (M5).
        return ModelRunnerOutput([fake_token(seq.request_id, len(seq.token_ids))
                                  if s.num_computed_tokens + len(s.new_token_ids)
                                  == len(seq.token_ids) else None
                                  for seq, s in zip(seqs, scheduler_output.scheduled)],
                                 none, none)

    replace_forward(engine, execute_model)


@st.composite
def workloads(draw, max_kv_tokens: int = 6 * MODEL_MAX_LEN, min_max_tokens: int = 1,
              last_arrival: int = 8, min_requests: int = 1, min_batch_size: int = 1):
    requests = draw(st.lists(
        st.tuples(st.integers(1, 40),  # prompt length
                  st.integers(min_max_tokens, 20),  # max_tokens
                  st.integers(0, last_arrival),  # the step it arrives at
                  st.one_of(st.none(), st.integers(0, 25))),  # the step it is aborted at
        min_size=min_requests, max_size=12))
    return dict(max_batch_size=draw(st.integers(min_batch_size, 6)),
                max_num_batched_tokens=draw(st.integers(1, 80)),
                kv_tokens=draw(st.integers(MODEL_MAX_LEN, max_kv_tokens)),
                requests=requests)


@pytest.fixture(scope="module")
def tiny_kv_bytes_per_token():
    llm = load_stage(BATCHING_STAGES[0]).LLM("dummy:tiny-llama", max_model_len=MODEL_MAX_LEN,
                                             device="cpu", dtype="float32")
    return model_runner(llm).kv_cache_bytes_per_token()


def drive_random_workload(stage: str, workload: dict, bytes_per_token: int, check_step=None,
                          **engine_kwargs):
    """Run a workload on a fake forward pass; check every step; return the engine."""
    mod = load_stage(stage)
    limit, budget = workload["max_batch_size"], workload["max_num_batched_tokens"]
    llm = mod.LLM("dummy:tiny-llama", max_model_len=MODEL_MAX_LEN, max_batch_size=limit,
                  max_num_batched_tokens=budget, device="cpu", dtype="float32",
                  kv_cache_memory=workload["kv_tokens"] * bytes_per_token, **engine_kwargs)
    engine = llm.engine
    scheduler = engine.scheduler

    chunked = getattr(scheduler.config, "enable_chunked_prefill", False)

    def check(seqs, is_prefill, num_new):
        ids = [seq.seq_id for seq in seqs]
        assert 1 <= len(seqs) <= limit and len(set(ids)) == len(ids)
        assert len(scheduler.running) <= limit
        running = {seq.seq_id for seq in scheduler.running}
        assert not running & {seq.seq_id for seq in scheduler.waiting}
        assert set(ids) <= running
        new_tokens = sum(num_new.values())
        if chunked:  # M5: one budget for every step; all that run get their share first
            assert new_tokens <= budget
            assert new_tokens == budget or set(ids) == running
            chunk_cap = scheduler.config.max_chunk_size
            assert chunk_cap is None or max(num_new.values()) <= chunk_cap
        elif is_prefill:
            assert all(computed_before_step(seq, num_new) == 0 for seq in seqs)
            assert len(seqs) == 1 or new_tokens <= budget
        else:  # a decode step runs every running sequence, one token each
            assert set(ids) == running and new_tokens == len(seqs)
        if check_step is not None:
            check_step(engine, seqs, is_prefill, num_new)

    install_fake_forward(engine, check)
    requests = workload["requests"]
    prompts = {f"q{i}": [3 + (i * 31 + k) % 250 for k in range(n)]
               for i, (n, *_) in enumerate(requests)}
    outputs, finished, aborted_at = {}, {}, {}
    step = 0
    while step < 10_000:
        for i, (_, max_tokens, arrival, abort_at) in enumerate(requests):
            rid = f"q{i}"
            if arrival == step:
                engine.add_request(rid, prompts[rid], mod.SamplingParams(
                    temperature=0, max_tokens=max_tokens, ignore_eos=True))
            if abort_at is not None and step == max(arrival, abort_at) and rid not in finished:
                engine.abort_request(rid)
                aborted_at[rid] = len(outputs.get(rid, []))
        if step > 8 and not engine.has_unfinished_requests():
            break
        record_step(engine.step(), outputs, finished)
        # The scheduler advanced num_computed_tokens: all but the newest sampled token
        # (M5: or fewer, part way through a prompt).
        assert all(seq.num_computed_tokens < len(seq.token_ids) if chunked
                   else seq.num_computed_tokens == len(seq.token_ids) - 1
                   for seq in scheduler.running)
        step += 1
    assert not engine.has_unfinished_requests()
    for i, (n, max_tokens, _, _) in enumerate(requests):
        rid = f"q{i}"
        if rid in aborted_at:  # nothing after the abort, never finished
            assert len(outputs.get(rid, [])) == aborted_at[rid] and rid not in finished
            continue
        out = finished[rid]  # finished exactly once (record_step checks "once")
        assert out.token_ids == [fake_token(rid, n + j) for j in range(max_tokens)]
        assert out.finish_reason == "length"
        # Streaming: one output per step it ran in, each one token longer.
        assert [len(o.token_ids) for o in outputs[rid]] == list(range(1, max_tokens + 1))
    assert_kv_cache_empty(engine)
    stats = engine.kv_cache_stats()
    assert stats["max_concurrent_seqs"] <= limit
    # (M5: a request aborted part way through its prompt ran, and gave no output.)
    assert stats["max_concurrent_seqs"] >= 1 if outputs else (
        chunked or stats["max_concurrent_seqs"] == 0)
    return engine


def check_contiguous_slots(engine, seqs, is_prefill, num_new) -> None:
    scheduler = engine.scheduler
    held = [seq.kv_slot for seq in scheduler.running]
    assert None not in held and len(set(held)) == len(held)
    assert sorted(held + list(scheduler.free_slots)) == list(range(scheduler.num_kv_slots))
    assert all(seq.kv_slot is None for seq in scheduler.waiting)
    if not is_prefill and scheduler.waiting:  # prefill first: no one could be admitted
        assert (len(scheduler.running) >= scheduler.config.max_batch_size
                or not scheduler.free_slots)


@pytest.mark.parametrize("stage", BATCHING_STAGES)
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(workload=workloads())
def test_random_workloads_respect_the_limits(stage, workload, tiny_kv_bytes_per_token):
    drive_random_workload(stage, workload, tiny_kv_bytes_per_token)


@pytest.mark.parametrize("stage", CONTIGUOUS_STAGES)
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(workload=workloads())
def test_random_workloads_slots(stage, workload, tiny_kv_bytes_per_token):
    engine = drive_random_workload(stage, workload, tiny_kv_bytes_per_token,
                                   check_contiguous_slots)
    slots = engine.kv_cache_stats()["num_slots"]
    assert slots == min(workload["max_batch_size"], workload["kv_tokens"] // MODEL_MAX_LEN)
