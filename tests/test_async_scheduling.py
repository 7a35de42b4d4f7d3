"""Async scheduling (M4 on): the next step is scheduled and launched before the last
one's tokens are back on the host, and nothing a user sees changes.

The engine with `async_scheduling=True` must give exactly the outputs of the synchronous
engine (`False`): token ids, text, finish reasons and log-probabilities, greedy and
seeded, with stop strings, stop tokens, `min_tokens`, penalties, preemption on a tight
pool, aborts while a step is on the device, and errors inside a step. A sequence that
stopped on a token the host learns one step late never emits the token computed after
it, and a sequence whose last token is already on the device is not scheduled again.
On the CPU the steps do not overlap in time, but the bookkeeping is the same; the `gpu`
test runs both on CUDA with CUDA graphs (float32: bf16 sums of a different batch could
flip a near-tie, and the two modes batch the last steps differently).
"""

import gc

import pytest
import torch

from conftest import forward_entry, load_stage, run_cli, stages_with
from test_reliability import PROMPTS, assert_clean, fail_on_call

STAGES = stages_with("flash_attn")


def tiny(stage: str, async_scheduling: bool, **kwargs):
    return load_stage(stage).LLM("dummy:tiny-llama", device="cpu", max_model_len=128,
                                 async_scheduling=async_scheduling, **kwargs)


def small(stage: str, async_scheduling: bool):
    """The default model: its text is words, so stop strings can be cut from it."""
    return load_stage(stage).LLM("default", device="cpu", max_model_len=256,
                                 async_scheduling=async_scheduling)


def mixed_params(stage: str) -> list:
    """One of each kind of request: greedy, seeded, stops of every kind, penalties."""
    SP = load_stage(stage).SamplingParams
    return [SP(temperature=0, max_tokens=9, ignore_eos=True),
            SP(temperature=0.9, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True),
            SP(temperature=0.8, top_k=20, seed=3, max_tokens=12, stop_token_ids=[5, 9, 17]),
            SP(temperature=0, max_tokens=14, min_tokens=5, stop_token_ids=[5, 9, 17, 33]),
            SP(temperature=1.0, seed=11, max_tokens=16, repetition_penalty=1.4,
               frequency_penalty=0.3, ignore_eos=True),
            SP(temperature=0.7, seed=5, max_tokens=8, logprobs=3, ignore_eos=True),
            SP(temperature=0, max_tokens=6, prompt_logprobs=2, ignore_eos=True)]


def prompts_for(n: int) -> list[list[int]]:
    return [[3 + (i * 11 + j * 5) % 200 for j in range(6 + 4 * i)] for i in range(n)]


def rounded(logprobs):
    """Log-probabilities to 4 decimals: a step's batch can differ between the two modes
    (the last step of a sequence is skipped, preemption comes a step apart), and float32
    sums of a different batch differ in the last bits; tokens and ranks do not."""
    if logprobs is None:
        return None
    return [None if position is None else
            {token: (round(lp.logprob, 4), lp.rank, lp.decoded_token)
             for token, lp in position.items()} for position in logprobs]


def summary(outputs) -> list:
    """What a user sees of each request."""
    return [([(c.token_ids, c.text, c.finish_reason, c.stop_reason,
                             rounded(c.logprobs)) for c in o.outputs],
             rounded(o.prompt_logprobs)) for o in outputs]  # in order: ids differ


def stop_string_params(stage: str, llm) -> list:
    """Stop strings that the greedy runs of PROMPTS really meet (cut from their text)."""
    SP = load_stage(stage).SamplingParams
    free = llm.generate(PROMPTS, SP(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)
    texts = [o.outputs[0].text for o in free]
    assert all(len(text) > 8 for text in texts)
    return [SP(temperature=0, max_tokens=12, ignore_eos=True, stop=[text[5:8]])
            for text in texts]


@pytest.mark.parametrize("stage", STAGES)
def test_outputs_equal_the_synchronous_engine(stage):
    prompts, params = prompts_for(7), mixed_params(stage)
    sync, overlapped = tiny(stage, False), tiny(stage, True)
    assert overlapped.engine.describe_runner()["async_scheduling"] is True
    assert sync.engine.describe_runner()["async_scheduling"] is False
    expected = summary(sync.generate(prompts, params, use_tqdm=False))
    assert summary(overlapped.generate(prompts, params, use_tqdm=False)) == expected
    assert {o[0][0][2] for o in expected} >= {"stop", "length"}  # both kinds of ending ran
    assert_clean(overlapped)


@pytest.mark.parametrize("stage", STAGES)
def test_stop_strings_give_the_outputs_of_the_synchronous_engine(stage):
    sync, overlapped = small(stage, False), small(stage, True)
    stops = stop_string_params(stage, sync)
    expected = summary(sync.generate(PROMPTS, stops, use_tqdm=False))
    assert [o[0][0][3] for o in expected] == [p.stop[0] for p in stops]  # they did stop
    assert summary(overlapped.generate(PROMPTS, stops, use_tqdm=False)) == expected
    assert_clean(overlapped)


@pytest.mark.parametrize("stage", STAGES)
def test_preemption_on_a_tight_pool_gives_the_same_outputs(stage):
    prompts, params = prompts_for(7), mixed_params(stage)
    runs = {}
    for mode in (False, True):
        # 16 blocks of 4 tokens (tiny-llama: 512 bytes of K/V a token), prompts in chunks
        # of at most 16 tokens (M5 on)
        llm = tiny(stage, mode, kv_cache_memory=16 * 4 * 512, block_size=4,
                   max_num_batched_tokens=16)
        runs[mode] = summary(llm.generate(prompts, params, use_tqdm=False))
        assert llm.engine.kv_cache_stats()["num_preemptions"] > 0
        assert_clean(llm)
    assert runs[True] == runs[False]


def stream(engine, aborts: dict[int, str] = {}) -> dict[str, list[list[int]]]:
    """Step to the end; per request, the token ids of each output it got. `aborts`: the
    request to abort after the step of that number (counted from 1)."""
    seen: dict[str, list[list[int]]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen.setdefault(output.request_id, []).append(list(output.outputs[0].token_ids))
        steps += 1
        if steps in aborts:
            engine.abort_request(aborts[steps])
        assert steps < 500
    return seen


@pytest.mark.parametrize("stage", STAGES)
def test_the_next_step_is_scheduled_before_the_last_ones_tokens_are_back(stage):
    """The shape of the overlap: the first step returns nothing (its tokens are applied
    by the next call), and the decode launched meanwhile carries a pending token."""
    llm = tiny(stage, True)
    SP, engine = load_stage(stage).SamplingParams, llm.engine
    engine.add_request("a", PROMPTS[0], SP(temperature=0, max_tokens=4, ignore_eos=True))
    assert engine.step() == []  # the prefill is on the device; nothing is known yet
    seq = engine.sequences["a"]
    assert seq.num_pending_tokens == 1 and seq.num_output_tokens == 0
    launched = []
    real = getattr(engine.model_runner, forward_entry(engine))

    def spy(out):
        launched.append([list(s.new_token_ids) for s in out.scheduled])
        return real(out)
    setattr(engine.model_runner, forward_entry(engine), spy)
    (first,) = engine.step()  # launches the first decode, then applies the prefill
    pending = load_stage(f"{stage}.core.sched.output").PENDING_TOKEN
    assert launched == [[[pending]]] and len(first.outputs[0].token_ids) == 1
    assert seq.num_pending_tokens == 1  # the decode's token is on the device now
    while engine.has_unfinished_requests():
        engine.step()
    # prefill + 3 decodes: the 4th token was sampled by the 3rd decode, and no step ran
    # after it was known to be the last one
    assert len(launched) == 3 and all(step == [[pending]] for step in launched)
    assert_clean(llm)


@pytest.mark.parametrize("stage", STAGES)
def test_a_stopped_sequence_never_emits_the_token_computed_after_its_stop(stage):
    sync = small(stage, False)
    stops = stop_string_params(stage, sync)
    for i, p in enumerate(stops):
        sync.engine.add_request(f"s{i}", PROMPTS[i], p)
    expected = stream(sync.engine)
    overlapped = small(stage, True)
    for i, p in enumerate(stops):
        overlapped.engine.add_request(f"s{i}", PROMPTS[i], p)
    got = stream(overlapped.engine)
    assert got == expected  # the same outputs, one step at a time, and no more
    assert all(len(outputs[-1]) < 12 for outputs in got.values())  # stopped early
    assert_clean(overlapped)


@pytest.mark.parametrize("stage", STAGES)
def test_abort_mid_flight_drops_the_request_and_keeps_the_others(stage):
    SP = load_stage(stage).SamplingParams
    params = SP(temperature=0.8, seed=2, max_tokens=10, ignore_eos=True)
    expected = {o.request_id: o.outputs[0].token_ids for o in
                tiny(stage, False).generate(PROMPTS, params, use_tqdm=False)}
    llm = tiny(stage, True)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"req-{i}", prompt, params)
    outputs: dict[str, list] = {}
    for _ in range(3):
        for o in engine.step():
            outputs.setdefault(o.request_id, []).append(o)
    assert "req-1" in [s.seq_name for s in engine.in_flight[0].scheduled]
    engine.abort_request("req-1")  # its decode is on the device
    got_after = stream(engine)
    assert "req-1" not in got_after  # nothing more for it, not even the token in flight
    assert not any(o.finished for o in outputs.get("req-1", []))
    for rid in ("req-0", "req-2"):
        assert got_after[rid][-1] == expected[rid]
    assert_clean(llm)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("fail_at", [1, 2, 4])
@pytest.mark.parametrize("where", ["entry", "after sampling"])
def test_a_failed_launch_is_run_again(stage, fail_at, where):
    """The launch of a step fails (before or while the one before it is on the device;
    at its start, or after it sampled): after the error, stepping on gives a clean run's
    tokens (a retried step still takes its pending tokens from the step before). After
    sampling, greedy only: a failed step has drawn from the seeded random streams."""
    params = mixed_params(stage)[:3] if where == "entry" else [mixed_params(stage)[0]] * 3
    expected = summary(tiny(stage, False).generate(PROMPTS, params, use_tqdm=False))
    llm = tiny(stage, True)
    engine = llm.engine
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        engine.add_request(f"req-{i}", prompt, p)
    method = forward_entry(engine) if where == "entry" else "_prompt_logprobs"
    restore = fail_on_call(fail_at, RuntimeError("boom"))(engine.model_runner, method)
    finished = {}
    with pytest.raises(RuntimeError, match="boom"):
        for _ in range(fail_at + 1):
            finished.update({o.request_id: o for o in engine.step() if o.finished})
    restore()
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert summary([finished[f"req-{i}"] for i in range(3)]) == expected
    assert_clean(llm)


@pytest.mark.parametrize("stage", STAGES)
def test_an_error_while_results_are_applied_runs_both_steps_again(stage, monkeypatch):
    """An error half-way through applying a step's tokens, while the next step (built on
    them) is on the device: both are taken back and run again, same tokens as a clean
    run (a repetition penalty makes the tokens depend on the sampler's history)."""
    SP = load_stage(stage).SamplingParams
    params = SP(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.5)
    expected = {f"r{i}": o.outputs[0].token_ids for i, o in
                enumerate(tiny(stage, False).generate(PROMPTS, params, use_tqdm=False))}
    llm = tiny(stage, True)
    owner = load_stage(f"{stage}.core.sched.stop_checker").StopChecker
    real, calls = owner.append_token, [0]
    for i, prompt in enumerate(PROMPTS):
        llm.engine.add_request(f"r{i}", prompt, params)
    llm.engine.step()
    llm.engine.step()

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("boom while applying results")
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, "append_token", flaky)
    with pytest.raises(RuntimeError):
        llm.engine.step()
    monkeypatch.setattr(owner, "append_token", real)
    assert llm.engine.in_flight is None
    finished = {}
    while llm.engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in llm.engine.step() if o.finished})
    assert {rid: o.outputs[0].token_ids for rid, o in finished.items()} == expected
    assert_clean(llm)


@pytest.mark.parametrize("stage", STAGES)
def test_the_setting_is_checked_and_off_by_default(stage):
    mod = load_stage(stage)
    with pytest.raises(ValueError, match="async_scheduling"):
        mod.EngineConfig(async_scheduling="yes")
    assert mod.EngineConfig().async_scheduling is False
    engine = tiny(stage, False).engine
    assert engine.describe_runner()["async_scheduling"] is False and engine.in_flight is None


@pytest.mark.parametrize("stage", STAGES)
def test_the_demo_runs_with_async_scheduling_and_says_so(stage):
    args = ("--model", "dummy:tiny-llama", "--max-tokens", "6", "--ignore-eos")
    on, off = run_cli(stage, *args, "--async-scheduling"), run_cli(stage, *args)
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert "the next step scheduled while one runs" in on.stdout
    assert "each step scheduled after the last one's results" in off.stdout
    replies = [r.stdout.split("KV cache:")[0] for r in (on, off)]
    assert replies[0] == replies[1] and replies[0].count("--- ") >= 2  # the same text


@pytest.mark.gpu
@pytest.mark.parametrize("stage", STAGES)
def test_on_cuda_with_graphs_the_outputs_equal_the_synchronous_engine(stage):
    prompts = [[3 + (i * 37 + j * 11) % 30000 for j in range(20 + 9 * i)] for i in range(14)]
    params = (mixed_params(stage) * 2)[:len(prompts)]
    runs = {}
    for mode in (False, True):
        llm = load_stage(stage).LLM("dummy:qwen2.5-0.5b", device="cuda", dtype="float32",
                                    async_scheduling=mode, gpu_memory_utilization=0.5)
        assert llm.engine.describe_runner()["cuda_graphs"] is not None
        runs[mode] = summary(llm.generate(prompts, params, use_tqdm=False))
        assert_clean(llm)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert runs[True] == runs[False]
